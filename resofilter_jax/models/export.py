"""Export an NNX model to a Hugging Face directory (config.json + model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.config import HF_ARCHITECTURE_NAME
from resofilter_jax.models.registry import named_params
from resofilter_jax.models.stacking import is_stacked_name, per_layer_params

_TORCH_DTYPE_NAME = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}


def export_hf(
    model: CausalLM,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    dtype: jnp.dtype | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> Path:
    """Writes `model` so that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it.

    Args:
        model: any resofilter_jax causal LM; layers stored stacked are written per layer
            under their HF names, exactly as the unstacked model's.
        out_dir: created if missing.
        tokenizer: saved alongside when given.
        dtype: storage dtype of the written tensors (default: the parameters' own).
        max_shard_bytes: shards with a `model.safetensors.index.json` above this size.
    Returns:
        The output directory.
    """
    from safetensors.flax import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    params = named_params(model)
    if dtype is not None:
        params = {k: v.astype(dtype) for k, v in params.items()}
    # [L, ...] stacked layers: one host copy each, then per-layer views in HF order
    params = per_layer_params(
        {k: jax.device_get(v) if is_stacked_name(k) else v for k, v in params.items()}
    )
    first = next(iter(params.values()))
    hf = dict(cfg.hf_config)
    hf.pop("quantization_config", None)
    hf.update(
        model_type=cfg.model_type,
        architectures=[HF_ARCHITECTURE_NAME[cfg.model_type]],
        tie_word_embeddings=cfg.tie_word_embeddings,
        dtype=_TORCH_DTYPE_NAME.get(jnp.dtype(first.dtype).type, "float32"),
    )
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True, default=_jsonable))

    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name, value in params.items():
        nbytes = _nbytes(value)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = jax.device_get(value)
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        index = {
            "metadata": {"total_size": sum(_nbytes(v) for v in params.values())},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _nbytes(value: jax.Array) -> int:
    return int(np.prod(value.shape)) * jnp.dtype(value.dtype).itemsize


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__} in config.json")
