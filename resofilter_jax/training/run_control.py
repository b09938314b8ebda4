"""Run control of the train command: one live run per WORKDIR, signal stops, full disks.

* :func:`hold_workdir`: process 0 takes WORKDIR's :class:`~resofilter_jax.run_lock.RunLock`
  before anything in WORKDIR is touched (orbax deletes half-written checkpoints when it
  opens the directory: a second run must never get that far); every process of the job
  raises :class:`~resofilter_jax.run_lock.RunLockedError` when it is refused.
* :func:`stopped_message`: what an :class:`~resofilter_jax.stop_signals.Interrupted` run
  says (the step, the checkpoint saved, how to resume).

A full disk is turned into :class:`~resofilter_jax.data.atomic.DiskFullError` by
:func:`resofilter_jax.data.atomic.disk_full_error` (orbax reports ENOSPC as tensorstore's
``ValueError`` text, which :func:`~resofilter_jax.data.atomic.is_disk_full` recognises).
"""

from __future__ import annotations

from pathlib import Path

from resofilter_jax.run_lock import RunLock, hold_for_job
from resofilter_jax.scoring.distributed_plan import Hosts

COMMAND = "resofilter_jax.train"


def hold_workdir(workdir: Path, hosts: Hosts) -> RunLock | None:
    """Process 0's lock of ``workdir`` (None on the other processes); release it when done.

    Raises:
        RunLockedError: On every process, when a live run holds ``workdir``.
    """
    return hold_for_job(workdir, COMMAND, lead=hosts.index == 0, any_process=hosts.any_process)


def stopped_message(signal_name: str, done: int, total: int, workdir: Path, ran: bool) -> str:
    """The message of a run stopped by a signal after ``done`` of ``total`` steps (``ran``:
    this invocation ran steps, and checkpoint ``done`` was saved)."""
    left = "all steps are done" if done == total else f"{total - done} steps remain"
    if ran:
        saved, resume = f"checkpoint {done} is saved in {workdir / 'checkpoints'}", "resume"
    else:
        saved = "no step was run"
        resume = f"resume from checkpoint {done}" if done else "start"
    return (
        f"stopped by {signal_name} after step {done} of {total} ({left}); {saved}. "
        f"Run the same command again to {resume}."
    )
