"""The SFT tests' tiny models: a character-level tokenizer, random fp32 HF models (the style of
``support.models``), random examples and the SFT config with overrides."""

from __future__ import annotations

import functools
import string
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
import transformers

from resofilter_jax.configuration import load_config
from resofilter_jax.data import IGNORE_INDEX, SFTExample

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128
_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
HF_CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**{**_TINY, **kw}),
    "gemma2": lambda **kw: transformers.Gemma2Config(
        **{**_TINY, **kw}, head_dim=16, query_pre_attn_scalar=16, sliding_window=8
    ),
    "gpt2": lambda **kw: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=512,
        n_embd=64,
        n_layer=kw.get("num_hidden_layers", 2),
        n_head=4,
        initializer_range=0.15,
    ),
}


@functools.cache
def char_tokenizer() -> Any:
    """A character-level fast tokenizer (printable ASCII + newline) that prepends BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.printable[:95] + "\n":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_hf(name: str = "llama", seed: int = 0, layers: int = 2) -> transformers.PreTrainedModel:
    """A fresh random fp32 HF model with non-trivial norm weights."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(
        HF_CONFIGS[name](num_hidden_layers=layers), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return hf


def random_examples(n: int, seed: int, lo: int = 6, hi: int = 30) -> list[SFTExample]:
    """Examples of random ids and lengths whose first 2..5 positions are a masked prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(3, VOCAB, size=length).astype(np.int32)
        labels = ids.copy()
        labels[: int(rng.integers(2, 6))] = IGNORE_INDEX
        out.append(SFTExample(i, ids, labels, "ok"))
    return out


def sft_config(overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """configs/sft_smollm2.py with dotted ``overrides``."""
    return load_config(REPO / "configs/sft_smollm2.py", overrides)
