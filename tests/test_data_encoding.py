"""Tests for resofilter_jax.data.encoding against literal per-row reference tokenization."""

from __future__ import annotations

import numpy as np
import pytest
from support.data import (
    GSM8K_DEFAULT,
    LAYOUTS,
    SHAREGPT_DEFAULT,
    asset_path,
    build_tokenizer,
    load_smollm2,
    random_texts,
)

import resofilter_jax.data.encoding as encoding
from resofilter_jax.data import (
    IGNORE_INDEX,
    Record,
    SpecialLayout,
    encode_ifd_pairs,
    encode_sft_examples,
    encode_texts,
    encode_truncated,
    get_template,
    host_tokenize,
    load_records,
    num_scored,
    special_layout,
    truncate_ids,
)

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EDGE_TEXTS = [
    "",
    " ",
    "a",
    "\n\n",
    "<s>",
    "</s> x </s>",
    "<|im_start|>user\nhi<|im_end|>",
    "数据 😀 " * 30,
]


@pytest.fixture(scope="module", params=LAYOUTS)
def tok(request):
    t = build_tokenizer(request.param)
    t.chat_template = CHATML_JINJA
    return t


@pytest.fixture(scope="module")
def smol(request):
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    t = load_smollm2(cache.mkdir("resofilter_smollm2_tokenizer") if cache else None)
    if t is None:
        pytest.skip("SmolLM2 GGUF not available")
    return t


def make_records(n: int, seed: int) -> list[Record]:
    """Random records: some with input/system, some empty outputs, some error records."""
    rng = np.random.default_rng(seed)
    texts = random_texts(4 * n, seed, max_words=30)
    out = []
    for i in range(n):
        ins, inp, outp, sys_ = texts[4 * i : 4 * i + 4]
        inp = inp if rng.random() < 0.4 else ""
        sys_ = sys_ if rng.random() < 0.3 else ""
        if rng.random() < 0.08:
            outp = ""
        status = "error:bad_json" if rng.random() < 0.05 else "ok"
        out.append(Record(i, ins, inp, outp, system=sys_, status=status, turn=i % 3))
    return out


# ---------------------------------------------------------------- references (literal)


def ref_ifd(tk, prompt: str, output: str, max_length: int):
    """Superfiltering code_ifd/data_analysis.py, one record at a time."""
    whole = prompt + output
    ins_len = len(tk.encode(prompt, truncation=True, max_length=max_length))
    direct = tk.encode(output, truncation=True, max_length=max_length - ins_len + 1)
    cond = tk.encode(whole, truncation=True, max_length=max_length)
    start_c = len(tk.encode(whole[: whole.rfind(output)]))
    return direct, 0, cond, start_c  # the direct loss uses labels = input_ids


def hf_scored_count(ids: list[int], start: int) -> int:
    """Tokens counted by HF's shifted CE with labels[:start] = -100."""
    labels = np.array(ids, np.int64)
    labels[:start] = IGNORE_INDEX
    return int((labels[1:] != IGNORE_INDEX).sum())


def ref_sft(tk, source: str, target: str, max_length: int):
    src, tgt = tk.encode(source), tk.encode(target)
    bos = tk.bos_token_id
    adds_bos = bos is not None and tk.encode("")[:1] == [bos]
    if adds_bos and tgt[:1] == [bos]:
        tgt = tgt[1:]
    ids = [*src, *tgt, tk.eos_token_id][:max_length]
    labels = ([IGNORE_INDEX] * len(src) + [*tgt, tk.eos_token_id])[:max_length]
    return ids, labels


# ---------------------------------------------------------------- truncation parity


def test_special_layout(tok):
    layout = special_layout(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    expected = {
        (): SpecialLayout((), ()),
        (bos,): SpecialLayout((bos,), ()),
        (bos, eos): SpecialLayout((bos,), (eos,)),
    }[tuple(tok.encode(""))]
    assert layout == expected
    assert layout.matches(tok.encode("hello")) and layout.n_special == len(tok.encode(""))


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_truncated_matches_tokenizer(side):
    texts = EDGE_TEXTS + random_texts(40, seed=7)
    for layout_name in LAYOUTS:
        tk = build_tokenizer(layout_name)
        tk.truncation_side = side
        longest = max(len(tk.encode(t)) for t in texts)
        for L in sorted({*range(0, 12), *range(12, longest + 3, 7), longest - 1, longest}):
            got = encode_truncated(tk, texts, L)
            want = [tk.encode(t, truncation=True, max_length=L) for t in texts]
            assert got == want, (layout_name, side, L)


def test_encode_truncated_per_text_limits_and_fallback(tok, monkeypatch):
    texts = random_texts(30, seed=3)
    limits = [int(x) for x in np.random.default_rng(0).integers(0, 40, size=len(texts))]
    want = [
        tok.encode(t, truncation=True, max_length=m) for t, m in zip(texts, limits, strict=True)
    ]
    assert encode_truncated(tok, texts, limits) == want
    monkeypatch.setattr(encoding, "special_layout", lambda _: None)  # force the slow path
    assert encode_truncated(tok, texts, limits) == want
    with pytest.raises(ValueError, match="max_lengths"):
        encode_truncated(tok, texts, limits[:-1])


def test_truncate_ids_rules():
    layout = SpecialLayout((1,), (2,))
    ids = [1, 10, 11, 12, 2]
    assert truncate_ids(ids, layout, 4) == [1, 10, 11, 2]
    assert truncate_ids(ids, layout, 4, side="left") == [1, 11, 12, 2]
    assert truncate_ids(ids, layout, 2) == [1, 2]
    assert truncate_ids(ids, layout, 1) == ids  # below the special count: no cut (as HF)
    assert truncate_ids(ids, layout, 9) == ids
    assert truncate_ids([5, 6], SpecialLayout((), ()), 0) == []


def test_encode_texts_batching_is_transparent(tok):
    texts = random_texts(25, seed=11)
    assert encode_texts(tok, texts, batch=4) == [tok.encode(t) for t in texts]
    assert encode_texts(tok, texts, add_special_tokens=False, batch=3) == [
        tok.encode(t, add_special_tokens=False) for t in texts
    ]
    assert encode_texts(tok, []) == []


def test_num_scored_matches_hf_shift():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, start = int(rng.integers(0, 12)), int(rng.integers(0, 14))
        assert num_scored(n, start) == hf_scored_count(list(range(n)), start)


# ---------------------------------------------------------------- IFD pairs


def check_ifd(tk, records, max_length, template):
    tmpl = get_template(template, tk)
    pairs = encode_ifd_pairs(records, tk, max_length=max_length, template=template)
    assert len(pairs) == len(records)
    for r, p in zip(records, pairs, strict=True):
        assert (p.index, p.turn) == (r.index, r.turn)
        assert p.direct_ids.dtype == np.int32 and p.cond_ids.dtype == np.int32
        if not r.ok or r.output == "":
            assert p.status == (r.status if not r.ok else "empty_output")
            assert p.direct_ids.size == 0 and p.cond_ids.size == 0
            continue
        direct, start_d, cond, start_c = ref_ifd(tk, tmpl.prompt(r), r.output, max_length)
        assert p.direct_ids.tolist() == direct and p.direct_start == start_d
        assert p.cond_ids.tolist() == cond and p.cond_start == start_c
        scored = hf_scored_count(direct, start_d), hf_scored_count(cond, start_c)
        assert p.status == ("ok" if min(scored) > 0 else "no_response_tokens")
    return pairs


@pytest.mark.parametrize("max_length", [1, 2, 3, 8, 20, 64, 1024])
@pytest.mark.parametrize("template", ["none", "alpaca", "chatml", "chat"])
def test_ifd_pairs_match_reference(tok, max_length, template):
    records = make_records(40, seed=max_length)
    if max_length <= len(tok.encode("")):
        with pytest.raises(ValueError, match="no room"):
            encode_ifd_pairs(records, tok, max_length=max_length, template=template)
        return
    check_ifd(tok, records, max_length, template)


def test_ifd_statuses(tok):
    records = [
        Record(0, "short", output="a fine answer with several words"),
        Record(1, "x", output=""),
        Record(2, "", status="error:missing_field:output"),
        Record(3, "word " * 50, output="answer"),  # the prompt fills max_length
    ]
    pairs = check_ifd(tok, records, 16, "none")
    assert [p.status for p in pairs] == [
        "ok",
        "empty_output",
        "error:missing_field:output",
        "no_response_tokens",
    ]
    assert encode_ifd_pairs([], tok, max_length=8) == []


def test_chunked_encoding_is_transparent(tok):
    records = make_records(23, seed=8)
    whole = encode_ifd_pairs(records, tok, max_length=24)
    chunked = encode_ifd_pairs(records, tok, max_length=24, batch=5)
    for a, b in zip(whole, chunked, strict=True):
        assert (a.index, a.status, a.direct_start, a.cond_start) == (
            b.index,
            b.status,
            b.direct_start,
            b.cond_start,
        )
        assert a.direct_ids.tolist() == b.direct_ids.tolist()
        assert a.cond_ids.tolist() == b.cond_ids.tolist()
    sft = encode_sft_examples(records, tok, max_length=24)
    sft_chunked = encode_sft_examples(records, tok, max_length=24, batch=4)
    for a, b in zip(sft, sft_chunked, strict=True):
        assert (a.index, a.status) == (b.index, b.status)
        assert a.ids.tolist() == b.ids.tolist() and a.labels.tolist() == b.labels.tolist()


@pytest.mark.parametrize("workers", [2, 3, 64])
def test_worker_threads_are_transparent(tok, workers):
    """Several tokenizing threads give the same pairs and examples, in the same order."""
    records = make_records(150, seed=11)  # workers=64: chunks of the 64-record floor
    one = encode_ifd_pairs(records, tok, max_length=24)
    many = encode_ifd_pairs(records, tok, max_length=24, workers=workers)
    assert [p.index for p in many] == [r.index for r in records]
    for a, b in zip(one, many, strict=True):
        assert (a.index, a.status, a.direct_start, a.cond_start) == (
            b.index,
            b.status,
            b.direct_start,
            b.cond_start,
        )
        assert a.direct_ids.tolist() == b.direct_ids.tolist()
        assert a.cond_ids.tolist() == b.cond_ids.tolist()
    sft = encode_sft_examples(records, tok, max_length=24)
    sft_many = encode_sft_examples(records, tok, max_length=24, workers=workers)
    for a, b in zip(sft, sft_many, strict=True):
        assert (a.index, a.status) == (b.index, b.status)
        assert a.ids.tolist() == b.ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_host_workers_default_is_the_affinity(monkeypatch):
    assert host_tokenize.host_workers(3) == 3
    monkeypatch.setattr(host_tokenize.os, "sched_getaffinity", lambda _: {0, 1, 5}, raising=False)
    assert host_tokenize.host_workers(0) == 3


# Prompts ending in a newline before outputs that start with every kind of character the
# GPT-2 split pattern treats differently, plus joins the shortcut must leave to the tokenizer.
JOIN_PROMPTS = ["Q\n", "\n", "a b\n", "x.\n", "数据\n", "q\n\n", "q \n", "q\n ", "q", "9\n"]
JOIN_OUTPUTS = [
    "Hello",
    "'s fine",
    "'t",
    "123 go",
    "!?",
    "数据",
    "😀 x",
    " lead",
    "\nnext",
    "\tx",
    "x\n",
    "<s> special",
    "</s>",
    "<|im_start|>x",
    "\u00a0nbsp",
    "\u2028sep",
    "a",
    "\x1cz",
    "- item",
]


def _pairs_equal(a, b) -> bool:
    return (
        a.status == b.status
        and a.cond_start == b.cond_start
        and a.cond_ids.tolist() == b.cond_ids.tolist()
        and a.direct_ids.tolist() == b.direct_ids.tolist()
    )


def test_join_shortcut_equals_tokenizing_the_whole_text(tok, monkeypatch):
    """Where the whole text is built from the prompt's and the output's ids, it is exactly
    what the tokenizer gives for the whole text (checked against the full path)."""
    records = [
        Record(k, p, output=o)
        for k, (p, o) in enumerate((p, o) for p in JOIN_PROMPTS for o in JOIN_OUTPUTS)
    ]
    records += make_records(200, seed=21)
    template = get_template("none", tok)
    layout = special_layout(tok)
    assert encoding.joins_exactly(tok, layout)  # byte-level BPE, GPT-2 pattern
    joined = [
        r
        for r in records
        if r.ok and r.output and encoding.clean_join(template.prompt(r), r.output)
    ]
    assert len(joined) > 100  # the shortcut is exercised
    fast = encode_ifd_pairs(records, tok, max_length=40)
    for r, pair in zip(records, fast, strict=True):
        if r.ok and r.output:  # the shortcut's cond ids against the literal reference
            direct, _, cond, start = ref_ifd(tok, template.prompt(r), r.output, 40)
            assert pair.cond_ids.tolist() == cond and pair.cond_start == start, r
    monkeypatch.setattr(encoding, "joins_exactly", lambda *_: False)
    full = encode_ifd_pairs(records, tok, max_length=40)
    assert all(_pairs_equal(a, b) for a, b in zip(fast, full, strict=True))


def test_join_shortcut_is_off_where_it_is_not_exact(tok):
    from tokenizers import normalizers, pre_tokenizers

    layout = special_layout(tok)
    assert not encoding.joins_exactly(tok, None)  # no known special-token layout
    backend = tok.backend_tokenizer
    saved = backend.pre_tokenizer
    try:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        assert not encoding.joins_exactly(tok, layout)
        backend.pre_tokenizer = pre_tokenizers.Sequence([saved])  # e.g. Qwen2 / Llama 3
        assert not encoding.joins_exactly(tok, layout)
        backend.pre_tokenizer = saved
        backend.normalizer = normalizers.NFC()
        assert not encoding.joins_exactly(tok, layout)
    finally:
        backend.pre_tokenizer = saved
        backend.normalizer = None
    assert encoding.clean_join("Q\n", "A") and encoding.clean_join("\n", "A")
    for prompt, output in [("Q\n\n", "A"), ("Q \n", "A"), ("Q\n", " A"), ("Q", "A"), ("Q\n", "")]:
        assert not encoding.clean_join(prompt, output), (prompt, output)


def test_ifd_long_output_direct_budget(tok):
    r = Record(0, "instruction text here", output="answer words " * 40)
    (p,) = check_ifd(tok, [r], 32, "none")
    ins_len = len(tok.encode("instruction text here\n", truncation=True, max_length=32))
    assert p.direct_ids.size == 32 - ins_len + 1 and p.cond_ids.size == 32


# ---------------------------------------------------------------- SFT examples


@pytest.mark.parametrize("max_length", [1, 4, 16, 512])
@pytest.mark.parametrize("template", ["alpaca", "none", "gemma", "chatml", "chat"])
def test_sft_examples_match_reference(tok, max_length, template):
    records = make_records(30, seed=100 + max_length)
    tmpl = get_template(template, tok)
    examples = encode_sft_examples(records, tok, max_length=max_length, template=template)
    assert len(examples) == len(records)
    for r, ex in zip(records, examples, strict=True):
        assert (ex.index, ex.turn) == (r.index, r.turn)
        if not r.ok:
            assert ex.status == r.status and ex.ids.size == 0 and ex.labels.size == 0
            continue
        ids, labels = ref_sft(tok, tmpl.prompt(r), tmpl.response(r), max_length)
        assert ex.ids.tolist() == ids and ex.labels.tolist() == labels
        assert ex.ids.dtype == np.int32 and ex.labels.dtype == np.int32
        has_label = any(x != IGNORE_INDEX for x in labels)
        assert ex.status == ("ok" if has_label else "no_response_tokens")


def test_sft_layout_details(tok):
    r = Record(0, "Do it.", output="done")
    (ex,) = encode_sft_examples([r], tok, max_length=256, template="none")
    src = tok.encode("Do it.\n")
    tgt = tok.encode("done", add_special_tokens=False)
    assert ex.ids.tolist()[: len(src)] == src
    assert ex.labels.tolist()[: len(src)] == [IGNORE_INDEX] * len(src)
    suffix = [tok.eos_token_id] if len(tok.encode("")) == 2 else []  # BOS+EOS keeps its EOS
    assert ex.labels.tolist()[len(src) :] == [*tgt, *suffix, tok.eos_token_id]


def test_sft_needs_eos(tok):
    class NoEos:
        eos_token_id = None

        def __getattr__(self, name):
            return getattr(tok, name)

    with pytest.raises(ValueError, match="eos_token_id"):
        encode_sft_examples([Record(0, "a", output="b")], NoEos(), max_length=8)


# ---------------------------------------------------------------- real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def gsm8k_records() -> list[Record]:
    p = asset_path("RESOFILTER_GSM8K", GSM8K_DEFAULT)
    if p is None:
        return make_records(60, seed=5)
    return load_records(p, "gsm8k")[0][:60]


def test_smollm2_truncation_parity(smol, gsm8k_records):
    texts = EDGE_TEXTS + [r.instruction + "\n" + r.output for r in gsm8k_records]
    for L in (0, 1, 2, 5, 17, 64, 200):
        want = [smol.encode(t, truncation=True, max_length=L) for t in texts]
        assert encode_truncated(smol, texts, L) == want, L


@pytest.mark.parametrize(("template", "max_length"), [("none", 64), ("none", 512), ("chat", 128)])
def test_smollm2_ifd_parity(smol, gsm8k_records, template, max_length):
    pairs = check_ifd(smol, gsm8k_records, max_length, template)
    assert sum(p.status == "ok" for p in pairs) > len(pairs) // 2


@pytest.mark.parametrize("template", ["chatml", "chat", "alpaca"])
def test_smollm2_sft_parity(smol, gsm8k_records, template):
    tmpl = get_template(template, smol)
    examples = encode_sft_examples(gsm8k_records, smol, max_length=256, template=template)
    for r, ex in zip(gsm8k_records, examples, strict=True):
        ids, labels = ref_sft(smol, tmpl.prompt(r), tmpl.response(r), 256)
        assert ex.ids.tolist() == ids and ex.labels.tolist() == labels


def test_smollm2_join_shortcut_on_sharegpt(smol, monkeypatch):
    """Every ShareGPT first turn of the shipped file under SmolLM2: shortcut == full path."""
    path = asset_path("RESOFILTER_SHAREGPT", SHAREGPT_DEFAULT)
    if path is None:
        pytest.skip("ShareGPT not available")
    records, _ = load_records(path, "sharegpt", allow_truncated=True)
    joins = [(p, o) for p in JOIN_PROMPTS for o in JOIN_OUTPUTS]  # SmolLM2 merges "\n\n"
    records = records[:3000] + [Record(10_000 + k, p, output=o) for k, (p, o) in enumerate(joins)]
    template = get_template("none", smol)
    assert encoding.joins_exactly(smol, special_layout(smol))
    n = sum(encoding.clean_join(template.prompt(r), r.output) for r in records if r.ok and r.output)
    assert n > 1000
    fast = encode_ifd_pairs(records, smol, max_length=1024, workers=2)
    monkeypatch.setattr(encoding, "joins_exactly", lambda *_: False)
    full = encode_ifd_pairs(records, smol, max_length=1024)
    assert all(_pairs_equal(a, b) for a, b in zip(fast, full, strict=True))


def test_smollm2_chatml_keeps_im_start(smol):
    # SmolLM2's bos_token is <|im_start|> but it adds no BOS, so a chatml response's
    # leading <|im_start|> must stay in the target.
    r = Record(0, "Hi", output="Hello")
    (ex,) = encode_sft_examples([r], smol, max_length=64, template="chatml")
    target = smol.encode("<|im_start|>assistant\nHello<|im_end|>")
    assert target[0] == smol.bos_token_id
    assert [x for x in ex.labels.tolist() if x != IGNORE_INDEX] == [*target, smol.eos_token_id]
