"""Helpers for the data-pipeline tests: offline tokenizers, asset paths and file writers."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def _cached(name: str) -> Path:
    """Where `python -m resofilter_jax.assets fetch` puts asset `name`."""
    from resofilter_jax import assets

    return assets.cache_dir() / name / assets.ASSETS[name].filename


SHAREGPT_DEFAULT = str(_cached("sharegpt"))
GSM8K_DEFAULT = str(_cached("gsm8k"))
SMOLLM2_DIR_DEFAULT = str(_cached("smollm2").parent)
SMOLLM2_GGUF = _cached("smollm2").name

LAYOUTS = ("none", "bos", "boseos")

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which "
    "be this had not or but have they one their all has been who more will would data model "
    "instruction response question answer token train test score filter select quality "
    "café naïve über straße 数据 模型 ünïcödé emoji 😀 tab\tnewline\n 0 1 2 3 42 3.14 -7 "
    "{ } [ ] ( ) , . ; : ! ? ' \" \\ / <tag> #### ### Response: Input: Instruction:"
).split(" ")


def asset_path(env: str, default: str) -> Path | None:
    """Path from env var ``env`` (or ``default``) if it exists, else None.

    With RESOFILTER_REQUIRE_ASSETS=1 (CI) a missing asset is an error, never a skip.
    """
    p = Path(os.environ.get(env, default))
    if not p.exists() and os.environ.get("RESOFILTER_REQUIRE_ASSETS") == "1":
        raise FileNotFoundError(f"{p} missing: run `python -m resofilter_jax.assets fetch`")
    return p if p.exists() else None


@functools.cache
def sharegpt_rows() -> tuple[list[tuple[int, Any]], Any] | None:
    """All complete raw rows of the shipped (truncated) ShareGPT file and the read report.

    Cached for the test session so the 125 MB file is parsed once; None if absent.
    """
    from resofilter_jax.data import ReadReport, iter_raw_rows

    p = asset_path("RESOFILTER_SHAREGPT", SHAREGPT_DEFAULT)
    if p is None:
        return None
    report = ReadReport()
    rows = list(iter_raw_rows(p, allow_truncated=True, report=report))
    return rows, report


def random_texts(n: int, seed: int, max_words: int = 40) -> list[str]:
    """Deterministic pseudo-random texts (mixed scripts, digits, punctuation, newlines)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, max_words + 1))
        words = [_WORDS[int(j)] for j in rng.integers(0, len(_WORDS), size=k)]
        seps = [" " if rng.random() < 0.85 else "\n" for _ in words]
        out.append("".join(w + s for w, s in zip(words, seps, strict=True)).rstrip(" "))
    return out


def build_tokenizer(layout: str) -> Any:
    """A small byte-level BPE wrapped in ``PreTrainedTokenizerFast`` (no network).

    Args:
        layout: ``none`` (GPT-2-like, no added tokens), ``bos`` (Llama-like) or
            ``boseos`` (BOS and EOS around every sequence).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(random_texts(400, seed=1234), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if layout == "none":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif layout == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    elif layout == "boseos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", bos), ("</s>", eos)],
        )
    else:
        raise ValueError(layout)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def load_smollm2(cache_root: Path | None = None) -> Any | None:
    """The real SmolLM2 tokenizer from the shipped GGUF file, or None if absent.

    Parsing the GGUF vocabulary takes 10-25 s, so with ``cache_root`` the tokenizer is
    saved there once (keyed by file size, mtime and transformers version) after checking
    that the saved copy encodes and renders chats exactly like the GGUF one.
    """
    import transformers
    from transformers import AutoTokenizer

    d = asset_path("RESOFILTER_SMOLLM2", SMOLLM2_DIR_DEFAULT)
    if d is None or not (d / SMOLLM2_GGUF).exists():
        return None
    cached = None
    if cache_root is not None:
        st = (d / SMOLLM2_GGUF).stat()
        cached = cache_root / f"{st.st_size}-{st.st_mtime_ns}-{transformers.__version__}"
        if (cached / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF)
    if cached is not None:
        tok.save_pretrained(str(cached))
        copy = AutoTokenizer.from_pretrained(str(cached))
        probes = random_texts(50, seed=99) + ["<|im_start|>user\nhi<|im_end|>", ""]
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        same = [copy.encode(t) for t in probes] == [tok.encode(t) for t in probes] and (
            copy.apply_chat_template(chat, tokenize=False)
            == tok.apply_chat_template(chat, tokenize=False)
        )
        if not same:
            shutil.rmtree(cached)
    return tok


def write_json(path: Path, value: Any) -> Path:
    """Writes ``value`` as pretty-printed UTF-8 JSON."""
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[bytes | str | dict]) -> Path:
    """Writes JSONL; dict items are serialised, str/bytes items written verbatim."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path
