"""Evaluate a causal LM: held-out loss/perplexity, and GSM8K exact match by greedy decoding.

    python -m resofilter_jax.evaluate --config configs/eval_smollm2_gsm8k.py \
        --config.model.path=runs/x/hf --config.data.path=heldout.jsonl \
        --config.output_dir=runs/x/eval

The command parses the config and calls :func:`resofilter_jax.training.evaluation.run`
(tasks ``loss`` and ``gsm8k``, see there), which writes OUTPUT_DIR/eval.json and, for gsm8k,
predictions.jsonl.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from resofilter_jax.configuration import ConfigError, check_argv
from resofilter_jax.runtime import tune_allocator


def main(argv: list[str]) -> None:
    """absl entry point: evaluates with the config given by --config and prints the metrics."""
    tune_allocator()  # before JAX starts: keep XLA's big buffers (runtime.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    del argv
    from resofilter_jax.training.evaluation import run

    config = flags.FLAGS.config
    try:
        summary = run(config)
    except ConfigError as e:  # renamed fields, dtype names: a message, not a traceback
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2, default=str))


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "ml_collections config file")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    check_argv(sys.argv[1:])
    _define_flags()
    app.run(main)
