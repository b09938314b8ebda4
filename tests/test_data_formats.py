"""Tests for resofilter_jax.data.formats (rows -> records) and .templates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from support.data import (
    GSM8K_DEFAULT,
    asset_path,
    build_tokenizer,
    sharegpt_rows,
    write_json,
    write_jsonl,
)

from resofilter_jax.data import (
    DataError,
    Record,
    RowError,
    TemplateError,
    detect_format,
    get_template,
    load_records,
    to_records,
)


def recs(rows: list, fmt: str = "auto", **kw) -> list[Record]:
    return list(to_records(list(enumerate(rows)), fmt, **kw))


def conv(*turns: tuple[str, str], cid: str = "c") -> dict:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


# ---------------------------------------------------------------- single-pair formats


def test_alpaca():
    rows = [
        {"instruction": "I0", "input": "X0", "output": "O0", "id": "a"},
        {"instruction": "I1", "output": "O1", "id": 7},
        {"instruction": "I2", "input": None, "output": "", "id": None},
    ]
    assert recs(rows, "alpaca") == [
        Record(0, "I0", "X0", "O0", id="a"),
        Record(1, "I1", "", "O1", id="7"),
        Record(2, "I2", "", "", id=None),
    ]


def test_query_response_and_gsm8k():
    assert recs([{"query": "q", "response": "r"}], "query_response") == [Record(0, "q", output="r")]
    assert recs([{"question": "q", "answer": "a"}], "gsm8k") == [Record(0, "q", output="a")]


def test_fields_rename():
    rows = [{"prompt": "p", "completion": "c", "ctx": "x", "uid": "u1"}]
    fields = {"instruction": "prompt", "output": "completion", "input": "ctx", "id": "uid"}
    expected = [Record(0, "p", "x", "c", id="u1")]
    assert recs(rows, "alpaca", fields=fields) == expected
    assert recs(rows, "auto", fields=fields) == expected
    with pytest.raises(ValueError, match="not fields of format"):
        recs(rows, "gsm8k", fields={"bogus": "x"})


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"query": "a", "response": "b", "type": "x"}, "query_response"),
        ({"question": "a", "answer": "b"}, "gsm8k"),
        ({"id": "1", "conversations": []}, "sharegpt"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_fails():
    with pytest.raises(DataError, match="cannot detect"):
        detect_format({"text": "x"})
    with pytest.raises(DataError, match="cannot detect"):
        recs([{"text": "x"}])


def test_auto_detects_from_first_good_row_after_errors():
    rows = [(0, RowError("bad_json", "line 1: x")), (1, {"question": "q", "answer": "a"})]
    got = list(to_records(rows, "auto", on_error="status"))
    assert got == [Record(0, "", status="error:bad_json"), Record(1, "q", output="a")]


@pytest.mark.parametrize(
    ("fmt", "row", "status"),
    [
        ("alpaca", {"input": "", "output": "o"}, "error:missing_field:instruction"),
        ("alpaca", {"instruction": "i"}, "error:missing_field:output"),
        ("alpaca", {"instruction": 3, "output": "o"}, "error:wrong_type:instruction"),
        ("alpaca", {"instruction": "i", "output": None}, "error:wrong_type:output"),
        ("alpaca", {"instruction": "i", "output": ["o"]}, "error:wrong_type:output"),
        ("alpaca", {"instruction": "i", "input": 5, "output": "o"}, "error:wrong_type:input"),
        ("query_response", {"query": "q"}, "error:missing_field:output"),
        ("query_response", {"query": {"a": 1}, "response": "r"}, "error:wrong_type:instruction"),
        ("gsm8k", {"answer": "a"}, "error:missing_field:instruction"),
        ("gsm8k", {"question": "q", "answer": 4}, "error:wrong_type:output"),
        ("sharegpt", {"id": "x"}, "error:missing_field:conversations"),
        ("sharegpt", {"conversations": "hi"}, "error:wrong_type:conversations"),
        ("sharegpt", {"conversations": ["hi"]}, "error:wrong_type:conversations"),
        ("sharegpt", {"conversations": [{"value": "v"}]}, "error:missing_field:from"),
        ("sharegpt", {"conversations": [{"from": "human"}]}, "error:missing_field:value"),
        ("sharegpt", {"conversations": [{"from": "human", "value": 1}]}, "error:wrong_type:value"),
        ("sharegpt", {"conversations": [{"from": None, "value": "v"}]}, "error:wrong_type:from"),
    ],
)
def test_bad_rows_both_modes(fmt, row, status):
    good = {
        "alpaca": {"instruction": "i", "output": "o"},
        "query_response": {"query": "i", "response": "o"},
        "gsm8k": {"question": "i", "answer": "o"},
        "sharegpt": conv(("human", "i"), ("gpt", "o")),
    }[fmt]
    got = recs([good, row, good], fmt, on_error="status")
    assert [r.index for r in got] == [0, 1, 2]
    assert [r.status for r in got] == ["ok", status, "ok"]
    assert got[1].instruction == "" and got[1].output == ""
    field = status.rsplit(":", 1)[1]
    with pytest.raises(DataError, match=rf"row 1: .*{field}") as info:
        recs([good, row, good], fmt)
    assert status.removeprefix("error:") in str(info.value)


def test_row_errors_pass_through_or_raise():
    rows = [(0, {"instruction": "i", "output": "o"}), (1, RowError("invalid_utf8", "line 2: x"))]
    got = list(to_records(rows, "alpaca", on_error="status"))
    assert got[1] == Record(1, "", status="error:invalid_utf8")
    with pytest.raises(DataError, match=r"row 1: line 2: x \[invalid_utf8\]"):
        list(to_records(rows, "alpaca"))


def test_bad_options():
    with pytest.raises(ValueError, match="fmt"):
        to_records([], "csv")  # checked at call time, before iterating
    with pytest.raises(ValueError, match="sharegpt_turns"):
        recs([], "sharegpt", sharegpt_turns="last")
    with pytest.raises(ValueError, match="on_error"):
        recs([], "alpaca", on_error="skip")


# ---------------------------------------------------------------- ShareGPT


def test_sharegpt_first_mode():
    rows = [
        conv(("human", "h0"), ("gpt", "g0"), ("human", "h1"), ("gpt", "g1"), cid="a"),
        conv(("gpt", "g"), ("human", "h"), ("gpt", "g2"), cid="b"),  # starts with gpt
        conv(("system", "S"), ("user", "h"), ("assistant", "g"), cid="c"),
        conv(("System", "S1"), ("system", "S2"), ("Human", "h"), ("ChatGPT", "g"), cid="d"),
        conv(("human", "h"), ("human", "h2"), ("gpt", "g"), cid="e"),  # no adjacent pair first
        conv(cid="f"),  # empty
        conv(("human", "h"), cid="g"),  # no answer
        conv(("tool", "t"), ("human", "h"), ("gpt", "g"), cid="h"),  # unknown role first
        conv(("human", "h"), ("bard", "g"), cid="i"),
        conv(("system", "S"), cid="j"),
    ]
    got = recs(rows, "sharegpt")
    assert got == [
        Record(0, "h0", output="g0", id="a"),
        Record(1, "", id="b", status="error:no_human_gpt_pair"),
        Record(2, "h", output="g", id="c", system="S"),
        Record(3, "h", output="g", id="d", system="S1\nS2"),
        Record(4, "", id="e", status="error:no_human_gpt_pair"),
        Record(5, "", id="f", status="error:no_human_gpt_pair"),
        Record(6, "", id="g", status="error:no_human_gpt_pair"),
        Record(7, "", id="h", status="error:no_human_gpt_pair"),
        Record(8, "h", output="g", id="i"),
        Record(9, "", id="j", system="S", status="error:no_human_gpt_pair"),
    ]
    # A conversation without a pair is data, not a read error: it never raises.
    assert recs(rows, "sharegpt", on_error="raise") == got


def test_sharegpt_all_mode():
    rows = [
        conv(("human", "h0"), ("gpt", "g0"), ("human", "h1"), ("gpt", "g1"), cid="a"),
        conv(("gpt", "x"), ("human", "h0"), ("gpt", "g0"), ("gpt", "y"), cid="b"),
        conv(("human", "a"), ("human", "h0"), ("gpt", "g0"), ("system", "s"), cid="c"),
        conv(("gpt", "x"), ("human", "y"), cid="d"),
        conv(("system", "S"), ("human", "h0"), ("gpt", "g0"), ("bing", "x"), cid="e"),
        conv(("human", "h0"), ("system", "s"), ("gpt", "g0"), cid="f"),  # not adjacent
    ]
    got = recs(rows, "sharegpt", sharegpt_turns="all")
    assert got == [
        Record(0, "h0", output="g0", id="a", turn=0),
        Record(0, "h1", output="g1", id="a", turn=1),
        Record(1, "h0", output="g0", id="b", turn=0),
        Record(2, "h0", output="g0", id="c", turn=0),
        Record(3, "", id="d", status="error:no_human_gpt_pair"),
        Record(4, "h0", output="g0", id="e", system="S"),
        Record(5, "", id="f", status="error:no_human_gpt_pair"),
    ]


def test_status_mode_every_row_once_in_order():
    rows = [
        conv(("human", "h"), ("gpt", "g")),
        {"conversations": 3},
        conv(("gpt", "g")),
        {"id": "no conv"},
        conv(("human", "h"), ("gpt", "g")),
    ]
    for mode in ("first", "all"):
        got = recs(rows, "sharegpt", sharegpt_turns=mode, on_error="status")
        assert [r.index for r in got] == [0, 1, 2, 3, 4]
        assert [r.ok for r in got] == [True, False, False, False, True]


# ---------------------------------------------------------------- load_records


def test_load_records_jsonl_status(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "a", "output": "b"},
            b"{broken",
            {"instruction": "c"},
            b"",
            b"[]",
            {"instruction": "d", "input": "e", "output": "f", "id": "x"},
        ],
    )
    records, report = load_records(p, "alpaca", on_error="status")
    assert [r.index for r in records] == [0, 1, 2, 3, 4]
    assert [r.status for r in records] == [
        "ok",
        "error:bad_json",
        "error:missing_field:output",
        "error:not_an_object",
        "ok",
    ]
    assert records[4] == Record(4, "d", "e", "f", id="x")
    assert report.rows_read == 5 and report.errors == 2
    with pytest.raises(DataError, match=r"line 2.*bad_json") as info:
        load_records(p, "alpaca")
    assert str(p) in str(info.value)
    with pytest.raises(DataError, match=r"row 2: missing field 'output'") as info:
        load_records(p, "alpaca", shard=(0, 2), on_error="raise")
    assert str(p) in str(info.value)


def test_load_records_json_array_auto(tmp_path):
    p = write_json(tmp_path / "d.json", [{"query": "q", "response": "r"}] * 3)
    records, report = load_records(p)
    assert records == [Record(i, "q", output="r") for i in range(3)]
    assert report.rows_read == 3 and not report.truncated


# ---------------------------------------------------------------- real files


def test_real_sharegpt_first_and_all():
    cached = sharegpt_rows()
    if cached is None:
        pytest.skip("ShareGPT file not available")
    rows = cached[0]
    first = list(to_records(rows, "sharegpt"))
    assert [r.index for r in first] == list(range(len(rows)))
    roles = {"human": "h", "user": "h", "gpt": "g", "chatgpt": "g", "bing": "g", "bard": "g"}

    def simple(c: list) -> bool:  # independent oracle for "first" mode
        k = 0
        while k < len(c) and c[k]["from"] == "system":
            k += 1
        return k + 1 < len(c) and [roles.get(t["from"]) for t in c[k : k + 2]] == ["h", "g"]

    expected_ok = [simple(row["conversations"]) for _, row in rows]
    assert [r.ok for r in first] == expected_ok
    counts = Counter(r.status for r in first)
    assert 11_000 < counts["ok"] < 11_300
    assert set(counts) == {"ok", "error:no_human_gpt_pair"}
    every = list(to_records(rows, "sharegpt", sharegpt_turns="all"))
    assert len(every) > 2 * len(first)
    assert sorted({r.index for r in every}) == list(range(len(rows)))
    idx = [r.index for r in every]
    assert idx == sorted(idx)
    for r in every:
        if r.ok:
            assert isinstance(r.instruction, str) and isinstance(r.output, str) and r.id


def test_real_gsm8k_records():
    p = asset_path("RESOFILTER_GSM8K", GSM8K_DEFAULT)
    if p is None:
        pytest.skip("GSM8K file not available")
    records, report = load_records(p, "gsm8k")
    assert len(records) == 1319 and all(r.ok for r in records)
    assert records[0].instruction.startswith("Janet") and "#### 18" in records[0].output
    assert load_records(p)[0] == records


# ---------------------------------------------------------------- templates


R_IN = Record(0, "Do X.", "the input", "the output")
R_NOIN = Record(1, "Do Y.", "", "out")
R_SYS = Record(2, "Do Z.", "inp", "resp", system="Be brief.")


def test_template_none():
    t = get_template("none")
    assert t.prompt(R_IN) == "Do X.\nthe input\n" and t.response(R_IN) == "the output"
    assert t.prompt(R_NOIN) == "Do Y.\n" and t.prompt(R_SYS) == "Do Z.\ninp\n"


def test_template_alpaca():
    t = get_template("alpaca")
    assert t.prompt(R_IN) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\nthe input\n\n### Response:"
    )
    assert t.prompt(R_NOIN) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDo Y.\n\n### Response:"
    )
    assert t.response(R_NOIN) == "out"


def test_template_gemma():
    t = get_template("gemma")
    assert t.prompt(R_IN) == "<start_of_turn>user\nDo X.\nthe input<end_of_turn>\n"
    assert t.prompt(R_SYS) == "<start_of_turn>user\nBe brief.\n\nDo Z.\ninp<end_of_turn>\n"
    assert t.response(R_IN) == "<start_of_turn>model\nthe output<end_of_turn>"


def test_template_chatml():
    t = get_template("chatml")
    assert t.prompt(R_NOIN) == "<|im_start|>user\nDo Y.<|im_end|>\n"
    assert t.prompt(R_SYS) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDo Z.\ninp<|im_end|>\n"
    )
    assert t.response(R_SYS) == "<|im_start|>assistant\nresp<|im_end|>"


CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_chat_uses_tokenizer_template():
    tok = build_tokenizer("none")
    tok.chat_template = CHATML_JINJA
    t = get_template("chat", tok)
    assert t.prompt(R_SYS) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDo Z.\ninp<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert t.response(R_SYS) == "resp<|im_end|>\n"
    assert t.prompt(R_NOIN).startswith("<|im_start|>user\nDo Y.")


def test_template_chat_errors():
    with pytest.raises(TemplateError, match="needs a tokenizer"):
        get_template("chat")
    tok = build_tokenizer("none")
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat_template"):
        get_template("chat", tok)
    # A template whose generation prompt is not a prefix of the full conversation.
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant-open]{% endif %}"
    )
    t = get_template("chat", tok)
    assert t.prompt(R_IN).endswith("[assistant-open]")
    with pytest.raises(TemplateError, match="does not start with"):
        t.response(R_IN)


def test_template_registry():
    with pytest.raises(TemplateError, match="unknown template"):
        get_template("vicuna")
    t = get_template("none")
    assert get_template(t) is t


def test_templates_on_every_real_format(tmp_path: Path):
    p = write_json(tmp_path / "a.json", [{"instruction": "i", "input": "x", "output": "o"}])
    (r,), _ = load_records(p)
    for name in ("none", "alpaca", "gemma", "chatml"):
        t = get_template(name)
        assert "i" in t.prompt(r) and "x" in t.prompt(r) and "o" in t.response(r)
