"""Fine-tune a causal LM on instruction data (e.g. rows kept by ``resofilter_jax.select``).

    python -m resofilter_jax.train --config configs/sft_smollm2.py \
        --config.data.path=selected.jsonl --config.workdir=runs/x

The command parses the config and calls :func:`resofilter_jax.training.pipeline.run`, which
writes WORKDIR/checkpoints/<step>/ (a re-run with the same WORKDIR resumes from the newest),
WORKDIR/metrics.jsonl, WORKDIR/hf/ (the trained model as a Hugging Face directory) and
WORKDIR/run.json. Multi-process jobs: see ``launch/README.md``.

Exit status: 0 when done; 1 with a one-line ``error:`` for a bad config, a full disk (the
path and the bytes needed) or a WORKDIR held by a live run (its host and pid); 128 + signal
after SIGTERM / SIGINT (the run stopped at a checkpoint and says how to resume; a second
signal stops at once, still leaving only complete checkpoints).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from resofilter_jax.configuration import ConfigError, check_argv
from resofilter_jax.runtime import tune_allocator


def main(argv: list[str]) -> None:
    """absl entry point: trains with the config given by --config and prints the summary."""
    tune_allocator()  # before JAX starts: keep XLA's big buffers (runtime.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    del argv
    from resofilter_jax.data.atomic import DiskFullError
    from resofilter_jax.parallel import initialize_distributed
    from resofilter_jax.run_lock import RunLockedError
    from resofilter_jax.stop_signals import Interrupted
    from resofilter_jax.training.pipeline import run

    config = flags.FLAGS.config
    if not config.get("dry_run", False):  # a dry run sets up its own devices
        initialize_distributed(config)  # before any other JAX use
    try:
        summary = run(config)
    except ConfigError as e:  # renamed fields, dtype names: a message, not a traceback
        raise SystemExit(f"error: {e}") from None
    except DiskFullError as e:  # names the path and the space; a re-run resumes
        raise SystemExit(f"error: {e.strerror}") from None
    except RunLockedError as e:  # names the live run that holds the workdir
        raise SystemExit(f"error: {e}") from None
    except Interrupted as e:  # SIGTERM / SIGINT: stopped after a checkpoint was saved
        print(f"resofilter_jax.train: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # a second SIGINT: stopped at once
        print(
            "resofilter_jax.train: stopped at once by a second SIGINT; only complete "
            "checkpoints are kept: run the same command again to resume from the newest",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGINT) from None
    print(json.dumps(summary, indent=2, default=str))


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "ml_collections config file")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    check_argv(sys.argv[1:])
    _define_flags()
    app.run(main)
