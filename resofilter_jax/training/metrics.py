"""Training metrics to the console (tqdm), ``WORKDIR/metrics.jsonl`` and, if installed, TensorBoard.

Training records are ``{"step", "loss", "lr", ...}`` (TensorBoard ``train/<name>``); held-out
records (``train.eval_every``) are records of their own, ``{"step", "eval_loss", "eval_ppl",
"eval_tokens", "eval_time_s"}`` (TensorBoard ``eval/<name>``), after the step's training one.

TensorBoard logging is used only when ``tensorboardX`` or ``flax.metrics.tensorboard`` (which
needs TensorFlow) is importable; nothing is installed for it.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from absl import logging

from resofilter_jax.data.atomic import atomic_write_bytes, disk_full_error, is_disk_full


def _tensorboard_writer(logdir: Path) -> Any | None:
    """A writer with ``add_scalar(tag, value, step)`` and ``close()``, or None."""
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(logdir))
    except ImportError:
        pass
    try:
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(str(logdir))
    except ImportError:
        return None

    class _Adapter:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            writer.scalar(tag, value, step)

        def close(self) -> None:
            writer.close()

    return _Adapter()


def truncate_jsonl(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Drops records with ``step > last_step`` (written after the checkpoint a run resumes).

    The file is rewritten atomically (a full disk leaves it as it was) when that changes it.

    Returns:
        The records kept, in file order.
    """
    if not path.is_file():
        return []
    kept = []
    old = path.read_text()
    for line in old.splitlines():
        try:
            record = json.loads(line)
            if int(record["step"]) <= last_step:
                kept.append(record)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill or a full disk
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != old:
        atomic_write_bytes(path, text.encode())
    return kept


class MetricsLogger:
    """Writes one JSON line per logged step and shows a progress bar.

    Args:
        workdir: where ``metrics.jsonl`` (and ``tensorboard/``) go.
        total_steps: the run's optimizer steps (progress bar length).
        start_step: steps already done (a resumed run); later records in the file are dropped.
        progress: show a tqdm bar.
        tensorboard: also write TensorBoard scalars when a writer is importable.
        write: False on the other processes of a multi-process job: nothing is written or
            shown, only :attr:`last` is kept (from the steps this process logs).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
        write: bool = True,
    ):
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        self.last: dict[str, Any] = {}  # the newest training record
        self.last_eval: dict[str, Any] = {}  # the newest held-out record (:meth:`log_eval`)
        self._eval_postfix = ""
        if not write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = truncate_jsonl(self.path, start_step)
        self._file = self.path.open("a")
        self._tb = _tensorboard_writer(Path(workdir) / "tensorboard") if tensorboard else None
        self.last = next((r for r in reversed(kept) if not _is_eval(r)), {})
        self.last_eval = next((r for r in reversed(kept) if _is_eval(r)), {})
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Records ``metrics`` of optimizer step ``step`` (1-based: steps done)."""
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self.last = record
        if self._file is None:
            return
        self._write(record)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float | int):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{record.get('loss', math.nan):.4f}",
                lr=f"{record.get('lr', math.nan):.2e}",
                tok_s=f"{record.get('tokens_per_s', math.nan):.0f}",
                **({"eval": self._eval_postfix} if self._eval_postfix else {}),
            )
        else:
            logging.info("step %d: %s", step, json.dumps(record))

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Records held-out ``metrics`` of step ``step``: a record of its own,
        ``{"step", "eval_<name>": ...}`` (TensorBoard: ``eval/<name>``), written after the
        step's training record."""
        record = {"step": int(step), **{f"eval_{k}": _plain(v) for k, v in metrics.items()}}
        self.last_eval = record
        if self._file is None:
            return
        self._write(record)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, float | int):
                    self._tb.add_scalar(f"eval/{k}", v, step)
        if self._bar is not None:
            self._eval_postfix = f"{record.get('eval_loss', math.nan):.4f}"
        else:
            logging.info("step %d eval: %s", step, json.dumps(record))

    def _write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` as one line, flushed.

        Raises:
            DiskFullError: If the disk is full (the file is closed; a cut line is dropped
                by the next run's :func:`truncate_jsonl`).
        """
        line = json.dumps(record) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            if not is_disk_full(e):
                raise
            with contextlib.suppress(OSError):
                self._file.close()  # its flush fails again; the descriptor is closed anyway
            self._file = None
            raise disk_full_error(self.path, len(line.encode()), e) from e

    def close(self) -> None:
        """Closes the file, the bar and the TensorBoard writer."""
        if self._file is not None:
            self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _is_eval(record: dict[str, Any]) -> bool:
    """Whether a metrics.jsonl record is a held-out one (:meth:`MetricsLogger.log_eval`)."""
    return any(k.startswith("eval_") for k in record)


def _plain(value: Any) -> Any:
    """A JSON-friendly Python number."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return int(f) if isinstance(value, int) else f
