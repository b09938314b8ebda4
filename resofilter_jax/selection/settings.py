"""Names and settings of a selection: output file names per drop rate, the scorer's data and
model settings read back from its ``run_config.json``, the model that embeds texts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_CONFIG = "run_config.json"  # the scorer's fingerprint, next to scores.parquet

__all__ = [
    "RUN_CONFIG",
    "embedding_model",
    "kept_label",
    "rate_output_path",
    "scored_data_settings",
    "scored_model_settings",
    "scored_template",
]


def kept_label(drop_rate: float) -> str:
    """``p<percent kept>`` as the paper names its subsets: 0.25 -> ``p75``, 0.125 -> ``p87_5``."""
    kept = round((1.0 - drop_rate) * 100, 6)
    return "p" + f"{kept:g}".replace(".", "_")


def rate_output_path(output: str | os.PathLike[str], drop_rate: float) -> Path:
    """The file of one drop rate: ``sel.jsonl`` -> ``sel.p75.jsonl`` for 0.25."""
    out = Path(output)
    return out.with_name(f"{out.stem}.{kept_label(drop_rate)}{out.suffix}")


def scored_data_settings(scores: str | os.PathLike[str]) -> dict[str, Any]:
    """The scorer's data settings (format, fields, sharegpt_turns) from its ``run_config.json``.

    Empty when the score file has no ``run_config.json`` next to it.
    """
    path = Path(scores).parent / RUN_CONFIG
    if not path.is_file():
        return {}
    data = json.loads(path.read_text()).get("data", {})
    return {k: data[k] for k in ("format", "fields", "sharegpt_turns") if k in data}


def scored_template(scores: str | os.PathLike[str]) -> str:
    """The scorer's prompt template (``run_config.json``), ``none`` when not recorded."""
    path = Path(scores).parent / RUN_CONFIG
    if not path.is_file():
        return "none"
    return str(json.loads(path.read_text()).get("template", "none"))


def scored_model_settings(scores: str | os.PathLike[str]) -> dict[str, Any]:
    """The scorer's model path, dtype, param_dtype and max_length from its ``run_config.json``.

    Only the keys the file has (none without the file).
    """
    path = Path(scores).parent / RUN_CONFIG
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    model = cfg.get("model", {})
    out = {k: model[k] for k in ("path", "dtype", "param_dtype", "matmul_precision") if k in model}
    if "max_length" in cfg:
        out["max_length"] = int(cfg["max_length"])
    return out


def embedding_model(
    scores: str | os.PathLike[str], model: str = "", dtype: str = "", max_length: int = 0
) -> dict[str, Any]:
    """``model_path``, ``dtype``, ``param_dtype``, ``matmul_precision``, ``max_length`` of the
    model that embeds texts.

    ``model`` if given, else the scorer's model as recorded next to ``scores`` (a local path
    or a hub id), else the embedded SmolLM2 GGUF. ``dtype`` (compute and storage) and
    ``max_length`` if given, else the scorer's, else float32 and 1024; the scorer's matmul
    precision (else ``highest`` for fp32 compute, ``default`` otherwise).

    Raises:
        ValueError: If the recorded model is a local path that no longer exists.
    """
    scorer = scored_model_settings(scores)
    path = model or scorer.get("path", "")
    if not path:
        from resofilter_jax import assets

        path = str(assets.smollm2_gguf())
    elif not model and Path(path).is_absolute() and not Path(path).exists():
        raise ValueError(f"the scorer's model {path} does not exist any more: pass --model")
    compute = dtype or scorer.get("dtype", "float32")
    return {
        "model_path": path,
        "dtype": compute,
        "param_dtype": dtype or scorer.get("param_dtype", compute),
        "matmul_precision": scorer.get(
            "matmul_precision", "highest" if compute == "float32" else "default"
        ),
        "max_length": max_length or scorer.get("max_length", 1024),
    }
