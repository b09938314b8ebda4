"""Load a causal LM and its tokenizer from a HF directory, a hub id, or a GGUF file.

Tensors are read one at a time and placed straight into an abstract (shape-only) model by
:func:`resofilter_jax.models.registry.load_state_dict`, so a checkpoint is never held twice in
host memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from resofilter_jax.models import checks
from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.config import ModelConfig, config_from_hf
from resofilter_jax.models.registry import abstract_model, load_state_dict, named_params

# HF name -> shape  ->  HF name -> final sharding (e.g. parallel.param_shardings on a mesh).
ShardingsFn = Callable[[Mapping[str, tuple[int, ...]]], Mapping[str, jax.sharding.Sharding]]

log = logging.getLogger("resofilter_jax.models")

# Checkpoint keys that are buffers or tied aliases, not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}


def as_dtype(name: str | jnp.dtype) -> jnp.dtype:
    """'bf16' / 'bfloat16' / 'fp32' / a dtype -> jnp dtype."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


@dataclasses.dataclass
class LoadedModel:
    """A model with the tokenizer and config it came with."""

    model: CausalLM
    tokenizer: Any
    config: ModelConfig
    source: str


def checkpoint_ignores(config: ModelConfig) -> tuple[str, ...]:
    """Suffixes of the checkpoint keys of `config` that are not parameters (skipped on load).

    Buffers (GPT-2's causal-mask `attn.bias`/`attn.masked_bias`, rotary `inv_freq`) and, for a
    model with tied embeddings, HF's `lm_head.weight` alias of the input embedding.
    """
    return IGNORED_SUFFIXES + (("lm_head.weight",) if config.tie_word_embeddings else ())


def _filled(
    config: ModelConfig,
    tensors: Iterable[tuple[str, Any]],
    *,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    source: str,
    shardings: ShardingsFn | None = None,
) -> CausalLM:
    """An abstract (shape-only) model of `config` filled from streamed (HF name, array) pairs;
    with `shardings`, each tensor is placed straight to its final sharding."""
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    placed = None
    if shardings is not None:
        shapes = {name: tuple(p.shape) for name, p in named_params(model).items()}
        placed = dict(shardings(shapes))
    return load_state_dict(
        model,
        tensors,
        ignore=checkpoint_ignores(config),
        source=source,
        shardings=placed,
    )


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name}, which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {model_dir} (PyTorch .bin checkpoints are not read: convert "
            "them with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def iter_safetensors(
    files: Iterable[Path], *, host: bool = False
) -> Iterator[tuple[str, jax.Array]]:
    """Yields (name, array) from safetensors files, one tensor at a time (bf16 kept).

    ``host``: the arrays stay in host memory (JAX's CPU device), to be placed shard by shard.
    """
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="flax") as handle:
            for name in handle.keys():
                if host:  # read under the CPU device, yielded outside the context
                    with jax.default_device(jax.local_devices(backend="cpu")[0]):
                        value = handle.get_tensor(name)
                else:
                    value = handle.get_tensor(name)
                yield name, value


_MULTIMODAL_PREFIXES = (
    ("model.language_model.", "model."),  # transformers >= 4.52 layout
    ("language_model.model.", "model."),  # original Gemma 3 release layout
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def text_model_tensors(
    tensors: Iterable[tuple[str, Any]],
) -> Iterator[tuple[str, Any]]:
    """Keeps the text model of a multimodal (Gemma 3) checkpoint, renamed to causal-LM keys."""
    for name, value in tensors:
        if name.startswith(_VISION_PREFIXES):
            continue
        for old, new in _MULTIMODAL_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        yield name, value


def gguf_tokenizer_cache(path: Path) -> Path:
    """Where the tokenizer of GGUF file `path` is kept once converted (keyed by size + mtime)."""
    from resofilter_jax.assets import cache_dir

    stat = path.stat()
    return cache_dir() / "tokenizers" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _gguf_tokenizer(path: Path) -> Any:
    """The tokenizer of a GGUF file, converted by transformers once and then cached.

    transformers' GGUF conversion parses every field of the file with gguf's reader and
    imports torch (tens of seconds); the cached copy (tokenizer.json etc.) loads in well under
    a second and tokenizes identically (tested).
    """
    from transformers import AutoTokenizer

    cached = gguf_tokenizer_cache(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ModuleNotFoundError as e:
        raise ImportError(
            f"reading the tokenizer of {path.name} uses transformers' GGUF reader, which "
            f"imports torch ({e}); install it (the CPU build is enough: pip install torch), "
            "or pass a Hugging Face model directory instead of a GGUF file"
        ) from e
    try:
        tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        tmp.replace(cached)
    except OSError as e:  # a read-only cache only costs speed
        log.warning("could not cache the tokenizer of %s in %s: %s", path, cached, e)
    return tok


def load_tokenizer(source: str | Path, gguf_file: str | None = None) -> Any:
    """A transformers fast tokenizer from a directory, a GGUF file, or a hub id."""
    from transformers import AutoTokenizer

    if gguf_file is not None:
        return _gguf_tokenizer(Path(source) / gguf_file)
    if Path(source).suffix == ".gguf" and Path(source).is_file():
        return _gguf_tokenizer(Path(source))
    return AutoTokenizer.from_pretrained(str(source))


def _resolve_hub(repo_id: str) -> Path:
    """Downloads config, safetensors and tokenizer files of a hub repo (needs the network)."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the cause attached
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Pass a local model directory or a .gguf file instead."
        ) from e
    return Path(path)


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str | jnp.dtype = jnp.float32,
    param_dtype: str | jnp.dtype = jnp.float32,
    tokenizer: bool = True,
    max_length: int | None = None,
    shardings: ShardingsFn | None = None,
) -> LoadedModel:
    """Loads a model (and tokenizer) from a HF directory, a `.gguf` file, or a hub id.

    Before returning it checks (`models/checks.py`) that `max_length` fits the model's
    positions (before any weight is read), that the tokenizer's ids fit the embedding, and
    that every parameter is finite.

    Args:
        source: a directory with config.json + *.safetensors (sharded index supported), a path
            to a `.gguf` file, or a hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`.
        dtype: compute dtype; param_dtype: storage dtype of the parameters.
        tokenizer: also load the tokenizer.
        max_length: the run's longest sequence (None: not checked).
        shardings: maps {HF name: shape} to {HF name: sharding}; every tensor is read on the
            host and placed shard by shard with its final sharding (no whole copy on one
            device: a model larger than one device loads for fsdp). None: default device.

    Raises:
        checks.BadModelError: a ValueError (MaxLengthError, TokenizerMismatchError,
            BadWeightsError) naming the path and what to change.
    """
    dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        from resofilter_jax.models.gguf_io import GGUFFile

        g = GGUFFile(path)
        config = config_from_hf(g.hf_config())
        checks.check_max_length(config, max_length, str(path))
        model = _filled(
            config,
            g.tensors(),
            dtype=dtype,
            param_dtype=param_dtype,
            source=str(path),
            shardings=shardings,
        )
        tok = load_tokenizer(path.parent, gguf_file=path.name) if tokenizer else None
        return _checked(LoadedModel(model, tok, config, str(path)))
    if not path.exists():
        if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
            raise FileNotFoundError(f"model path {str(source)!r} does not exist")
        path = _resolve_hub(str(source))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    raw_config = json.loads(config_file.read_text())
    config = config_from_hf(raw_config)
    checks.check_max_length(config, max_length, str(path))
    files = _safetensors_files(path)
    log.info("loading %s (%s, %d shard(s))", path, config.model_type, len(files))
    tensors = iter_safetensors(files, host=shardings is not None)
    if "text_config" in raw_config:  # multimodal checkpoint: load its text model
        tensors = text_model_tensors(tensors)
    model = _filled(
        config, tensors, dtype=dtype, param_dtype=param_dtype, source=str(path), shardings=shardings
    )
    tok = load_tokenizer(path) if tokenizer else None
    return _checked(LoadedModel(model, tok, config, str(path)))


def _checked(lm: LoadedModel) -> LoadedModel:
    """`lm` once its tokenizer fits its vocabulary and its weights are finite (else raises)."""
    if lm.tokenizer is not None:
        checks.check_tokenizer(lm.tokenizer, lm.config, lm.source)
    checks.check_finite(lm.model, lm.source)
    return lm
