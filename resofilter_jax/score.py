"""Score instruction data (Superfiltering IFD or ResoFilter resonance), resumable and sharded.

    python -m resofilter_jax.score --config configs/ifd_smollm2_sharegpt.py \
        --config.data.limit=256 --config.output_dir=outputs/ifd
    python -m resofilter_jax.score --config configs/reso_smollm2_gsm8k.py --config.data.limit=64

The command parses the config and calls :func:`resofilter_jax.scoring.pipeline.run`, which
writes OUTPUT_DIR/shards/*.parquet while running (a re-run with the same configuration
computes only the missing shards), then OUTPUT_DIR/scores.parquet, scores.jsonl and run.json.
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
    """absl entry point: runs the config given with --config and prints the summary."""
    tune_allocator()  # before JAX starts: keep XLA's big buffers (runtime.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    del argv
    from resofilter_jax.data.atomic import DiskFullError
    from resofilter_jax.parallel import initialize_distributed
    from resofilter_jax.run_lock import RunLockedError
    from resofilter_jax.scoring.pipeline import run
    from resofilter_jax.stop_signals import Interrupted

    config = flags.FLAGS.config
    if not config.get("dry_run", False):  # a dry run sets up its own devices
        initialize_distributed(config)  # before any other JAX use
    try:
        summary = run(config)
    except ConfigError as e:  # renamed fields, dtype names: a message, not a traceback
        raise SystemExit(f"error: {e}") from None
    except DiskFullError as e:  # names the path and the space; a re-run resumes
        raise SystemExit(f"error: {e.strerror}") from None
    except RunLockedError as e:  # names the live run that holds the output directory
        raise SystemExit(f"error: {e}") from None
    except Interrupted as e:  # SIGTERM / SIGINT: stopped at a shard boundary
        print(f"resofilter_jax.score: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    print(json.dumps(summary, indent=2))


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "ml_collections config file")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    check_argv(sys.argv[1:])
    _define_flags()
    app.run(main)
