"""Tests for resofilter_jax.data.readers: JSON arrays, JSONL, Parquet, optional readers."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.data import (
    GSM8K_DEFAULT,
    SHAREGPT_DEFAULT,
    asset_path,
    sharegpt_rows,
    write_json,
    write_jsonl,
)

from resofilter_jax.data import (
    DataError,
    ReadReport,
    RowError,
    TruncatedInputError,
    detect_reader,
    iter_raw_rows,
)

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Ünïcödé ✓ 数据 😀", "output": "naïve café", "nested": {"a": [1, 2.5, None]}},
    {"instruction": 'quote " backslash \\ tab \t', "output": "line\nbreak", "n": -12e3},
    {"instruction": "", "output": "", "flags": [True, False, None]},
]


def rows_of(path: Path, **kw) -> list:
    return list(iter_raw_rows(path, **kw))


def element_ends(data: bytes) -> list[int]:
    """Byte offsets just after each top-level element of a JSON array (test oracle)."""
    text = data.decode("utf-8")
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ends = []
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return ends
        _, pos = dec.raw_decode(text, pos)
        ends.append(len(text[:pos].encode("utf-8")))


# ---------------------------------------------------------------- JSON arrays


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 4 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_matches_json_loads(tmp_path, chunk_size, indent):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS * 3, indent=indent, ensure_ascii=False), encoding="utf-8")
    report = ReadReport()
    got = rows_of(p, chunk_size=chunk_size, report=report)
    assert got == list(enumerate(ROWS * 3))
    assert report.rows_read == 12 and report.errors == 0 and not report.truncated
    assert report.bytes_total == p.stat().st_size


@pytest.mark.parametrize("text", ["[]", "  [ \n ]  \n", "\ufeff[]"])
def test_json_empty_array(tmp_path, text):
    p = tmp_path / "e.json"
    p.write_text(text, encoding="utf-8")
    assert rows_of(p) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty file"),
        ("  \n ", "empty file"),
        ('{"data": []}', "expected a JSON array"),
        ('[{"a": 1}] x', "after the closing"),
        ('[{"a": 1}] ]', "after the closing"),
    ],
)
def test_json_bad_top_level(tmp_path, text, match):
    p = tmp_path / "b.json"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        rows_of(p)


def test_json_non_object_elements(tmp_path):
    p = write_json(tmp_path / "m.json", [{"a": 1}, 5, "s", [1], None, {"b": 2}, 12.5, True])
    got = rows_of(p, on_error="status")
    assert [i for i, _ in got] == list(range(8))
    assert got[0][1] == {"a": 1} and got[5][1] == {"b": 2}
    for i in (1, 2, 3, 4, 6, 7):
        assert isinstance(got[i][1], RowError) and got[i][1].reason == "not_an_object"
        assert got[i][1].status == "error:not_an_object"
    with pytest.raises(DataError, match=r"record 1.*not_an_object"):
        rows_of(p)


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_json_truncated_at_every_byte(tmp_path, chunk_size):
    data = json.dumps(ROWS, indent=1, ensure_ascii=False).encode("utf-8")
    ends = element_ends(data)
    p = tmp_path / "t.json"
    for cut in range(1, len(data) - 1):  # any cut keeps '[' and loses the final ']'
        p.write_bytes(data[:cut])
        complete = sum(e <= cut for e in ends)
        offset = ends[complete - 1] if complete else data.index(b"[") + 1
        with pytest.raises(TruncatedInputError) as info:
            rows_of(p, chunk_size=chunk_size)
        e = info.value
        assert (e.records, e.offset, e.bytes_total) == (complete, offset, cut), cut
        report = ReadReport()
        got = rows_of(p, chunk_size=chunk_size, allow_truncated=True, report=report)
        assert got == list(enumerate(ROWS[:complete])), cut
        assert report.truncated and report.bytes_unparsed == cut - offset
        assert report.rows_read == complete


def test_json_truncated_number_elements(tmp_path):
    p = tmp_path / "n.json"
    p.write_bytes(b"[1, 23, 456")  # the last number may be cut: not counted
    with pytest.raises(TruncatedInputError) as info:
        rows_of(p, on_error="status", chunk_size=2)
    assert info.value.records == 2 and info.value.offset == len(b"[1, 23")


def test_json_truncated_message_and_warning(tmp_path, caplog):
    data = json.dumps(ROWS).encode()
    p = tmp_path / "cut.json"
    p.write_bytes(data[: element_ends(data)[1] + 5])
    with pytest.raises(TruncatedInputError) as info:
        rows_of(p)
    msg = str(info.value)
    assert str(p) in msg and "2 complete records" in msg
    assert f"byte {element_ends(data)[1]}" in msg and "allow_truncated=True" in msg
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="resofilter_jax.data"):
        got = rows_of(p, allow_truncated=True, report=report)
    assert len(got) == 2 and report.truncated and report.bytes_unparsed == 5
    assert "cut off" in report.message
    assert any("cut off" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("chunk_size", [1, 4, 4096])
def test_json_syntax_error_mid_array(tmp_path, chunk_size):
    head = '[{"a": 1}, {"a": "é", '
    text = head + '"b" 2}, {"a": 3}' + " " * 100 + ', {"a": 4}]'
    p = tmp_path / "s.json"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        rows_of(p, chunk_size=chunk_size)
    assert not isinstance(info.value, TruncatedInputError)
    offset = len((head + '"b" ').encode())
    assert "record 1" in str(info.value) and f"byte {offset}" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        '[{"a": 1} {"a": 2}]',
        '[{"a": 1},]',
        '[{"a": 1},,{"a": 2}]',
        '[{"a": 1}, {"a": tru}]',
        '[{"a": 1}, {"a": "x\ny"}]',
        "[{'a': 1}]",
    ],
)
def test_json_syntax_errors_are_not_truncation(tmp_path, text):
    p = tmp_path / "s.json"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        rows_of(p, allow_truncated=True)
    assert not isinstance(info.value, TruncatedInputError)
    assert "syntax error" in str(info.value)


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
@pytest.mark.parametrize(
    ("data", "bad_at"),
    [
        (b'[{"a": "ok"}, {"a": "x\xffy"}]', 22),
        (b'[{"a": "\xc3("}]', 8),
        (b'[{"a": "\xe2\x82"}]', 8),
        (b'[{"a": "\xed\xa0\x80"}]', 8),  # encoded surrogate
    ],
)
def test_json_invalid_utf8(tmp_path, chunk_size, data, bad_at):
    p = tmp_path / "u.json"
    p.write_bytes(data)
    with pytest.raises(DataError, match=f"invalid UTF-8 at byte {bad_at}") as info:
        rows_of(p, chunk_size=chunk_size, on_error="status", allow_truncated=True)
    assert not isinstance(info.value, TruncatedInputError)


def test_json_cut_inside_multibyte_char_is_truncation(tmp_path):
    data = '[{"a": 1}, {"a": "数据"}]'.encode()
    p = tmp_path / "c.json"
    p.write_bytes(data[: data.index("数".encode()) + 1])
    with pytest.raises(TruncatedInputError) as info:
        rows_of(p, chunk_size=3)
    assert info.value.records == 1


def test_json_large_element_across_many_chunks(tmp_path):
    big = {"instruction": "x" * 100_000, "output": "é" * 50_000}
    p = write_json(tmp_path / "big.json", [big, {"a": 1}, big])
    assert [r for _, r in rows_of(p, chunk_size=1000)] == [big, {"a": 1}, big]


# ---------------------------------------------------------------- JSONL


def test_jsonl_rows_blank_lines_and_crlf(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n{"a": 2}\n\t\n{"a": 3}')
    assert rows_of(p) == [(0, {"a": 1}), (1, {"a": 2}), (2, {"a": 3})]


def mixed_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"a": 0},
            b"",
            b'{"a": "\xff"}',  # line 3: invalid UTF-8
            b'{"a": 2',  # line 4: bad JSON
            b"[1, 2]",  # line 5: not an object
            b'"text"',  # line 6: not an object
            b'{"a": 5} {"a": 6}',  # line 7: extra data
            {"a": 7},
            b"{'a': 8}",  # line 9: bad JSON
        ],
    )


def test_jsonl_status_mode_keeps_every_row_in_order(tmp_path):
    report = ReadReport()
    got = rows_of(mixed_jsonl(tmp_path), on_error="status", report=report)
    assert [i for i, _ in got] == list(range(8))
    reasons = [r.reason if isinstance(r, RowError) else "ok" for _, r in got]
    assert reasons == [
        "ok",
        "invalid_utf8",
        "bad_json",
        "not_an_object",
        "not_an_object",
        "bad_json",
        "ok",
        "bad_json",
    ]
    assert got[1][1].detail.startswith("line 3:") and got[2][1].detail.startswith("line 4:")
    assert got[6][1] == {"a": 7}
    assert report.rows_read == 8 and report.errors == 6


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([b'{"a": 1}', b"", b'{"a": "\xc3"}'], r"line 3: .*\[invalid_utf8\]"),
        ([b'{"a": 1}', b'{"a": }'], r"line 2: .*\[bad_json\]"),
        ([b"", b"42"], r"line 2: .*\[not_an_object\]"),
        ([b"null"], r"line 1: .*\[not_an_object\]"),
    ],
)
def test_jsonl_raise_mode(tmp_path, lines, match):
    p = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=match) as info:
        rows_of(p)
    assert str(p) in str(info.value)


def test_jsonl_truncated_last_line_is_bad_json(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": "cut')
    got = rows_of(p, on_error="status")
    assert len(got) == 3 and got[2][1].reason == "bad_json"


# ---------------------------------------------------------------- Parquet


def test_parquet_rows(tmp_path):
    p = tmp_path / "d.parquet"
    table = pa.table({"instruction": ["a", "b", None], "output": ["x", "", "z"], "id": [1, 2, 3]})
    pq.write_table(table, p, row_group_size=2)
    got = rows_of(p)
    assert got == [
        (0, {"instruction": "a", "output": "x", "id": 1}),
        (1, {"instruction": "b", "output": "", "id": 2}),
        (2, {"instruction": None, "output": "z", "id": 3}),
    ]


def test_parquet_bad_file(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="cannot read Parquet"):
        rows_of(p)


# ---------------------------------------------------------------- detection and options


def test_detect_reader(tmp_path):
    for name, kind in [("a.json", "json"), ("a.JSONL", "jsonl"), ("a.ndjson", "jsonl")]:
        (tmp_path / name).write_text("[]")
        assert detect_reader(tmp_path / name) == kind
    (tmp_path / "a.parquet").write_bytes(b"")
    assert detect_reader(tmp_path / "a.parquet") == "parquet"
    for marker in ("dataset_info.json", "state.json"):
        d = tmp_path / f"ds_{marker}"
        d.mkdir()
        (d / marker).write_text("{}")
        assert detect_reader(d) == "hf"
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a saved HF dataset"):
        detect_reader(tmp_path / "plain")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_reader(tmp_path / "a.csv")
    with pytest.raises(DataError, match="no such file"):
        detect_reader(tmp_path / "missing.json")


def test_explicit_reader_overrides_suffix(tmp_path):
    p = write_jsonl(tmp_path / "rows.txt", [{"a": 1}, {"a": 2}])
    assert len(rows_of(p, reader="jsonl")) == 2
    q = write_json(tmp_path / "arr.data", [{"a": 1}])
    assert rows_of(q, reader="json") == [(0, {"a": 1})]


def test_bad_options(tmp_path):
    p = write_json(tmp_path / "a.json", [])
    with pytest.raises(ValueError, match="on_error"):
        iter_raw_rows(p, on_error="skip")  # checked at call time, before iterating
    with pytest.raises(ValueError, match="reader"):
        rows_of(p, reader="csv")
    for shard in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="shard"):
            rows_of(p, shard=shard)
    with pytest.raises(DataError, match="no such file"):
        rows_of(tmp_path / "nope.jsonl", reader="jsonl")
    with pytest.raises(TypeError, match="unexpected options"):
        rows_of(p, streaming=True)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_rows(tmp_path, count):
    rows = [{"i": i} for i in range(11)]
    for p in (write_json(tmp_path / "s.json", rows), write_jsonl(tmp_path / "s.jsonl", rows)):
        seen = []
        for index in range(count):
            got = rows_of(p, shard=(index, count))
            assert all(n % count == index for n, _ in got)
            assert all(r == {"i": n} for n, r in got)
            seen += [n for n, _ in got]
        assert sorted(seen) == list(range(11))


@pytest.mark.parametrize(
    ("reader", "module", "extra"),
    [("hf", "datasets", "hf"), ("tfds", "tensorflow_datasets", "tfds")],
)
def test_optional_reader_missing_package(tmp_path, monkeypatch, reader, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ImportError, match=rf"pip install resofilter_jax\[{extra}\]"):
        rows_of("some/dataset", reader=reader)


def test_hf_directory_autodetect_needs_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(ImportError, match=r"pip install resofilter_jax\[hf\]"):
        rows_of(tmp_path)


# ---------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def sharegpt_file() -> Path:
    p = asset_path("RESOFILTER_SHAREGPT", SHAREGPT_DEFAULT)
    if p is None:
        pytest.skip("ShareGPT file not available")
    return p


def test_real_sharegpt_truncated(sharegpt_file):
    with pytest.raises(TruncatedInputError) as info:
        for _ in iter_raw_rows(sharegpt_file):
            pass
    e = info.value
    assert e.records > 17_000 and 0 < e.offset < e.bytes_total
    assert f"{e.records} complete records" in str(e) and f"byte {e.offset}" in str(e)
    assert str(sharegpt_file) in str(e) and "allow_truncated=True" in str(e)
    rows, report = sharegpt_rows()  # read with allow_truncated=True (cached for the session)
    assert [i for i, _ in rows] == list(range(e.records))
    assert all(isinstance(row, dict) and "conversations" in row for _, row in rows)
    assert report.rows_read == e.records and report.errors == 0
    assert report.truncated and report.bytes_unparsed == e.bytes_total - e.offset > 0
    assert report.bytes_total == e.bytes_total == sharegpt_file.stat().st_size
    assert f"after {e.records} complete records" in report.message


def test_real_gsm8k():
    p = asset_path("RESOFILTER_GSM8K", GSM8K_DEFAULT)
    if p is None:
        pytest.skip("GSM8K file not available")
    rows = rows_of(p)
    assert len(rows) == 1319
    assert all(set(r) == {"question", "answer"} for _, r in rows)
