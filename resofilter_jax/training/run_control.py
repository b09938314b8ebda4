"""Run control of the train command: one live run per WORKDIR, signal stops, full disks.

* :func:`hold_workdir`: process 0 takes WORKDIR's :class:`~resofilter_jax.run_lock.RunLock`
  before anything in WORKDIR is touched (orbax deletes half-written checkpoints when it
  opens the directory: a second run must never get that far); every process of the job
  raises :class:`~resofilter_jax.run_lock.RunLockedError` when it is refused.
* :func:`stopped_message`: what an :class:`~resofilter_jax.stop_signals.Interrupted` run
  says (the step, the checkpoint saved, how to resume).
* :func:`is_disk_full` / :func:`disk_full_error`: a write that ran out of space, as
  :class:`~resofilter_jax.data.atomic.DiskFullError` naming the path and the bytes needed
  (orbax reports ENOSPC as tensorstore's ``ValueError`` text, not as an ``OSError``).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from resofilter_jax.data.atomic import DiskFullError
from resofilter_jax.run_lock import RunLock, RunLockedError
from resofilter_jax.scoring.distributed_plan import Hosts

COMMAND = "resofilter_jax.train"
# How ENOSPC / EDQUOT reads in errors that are not OSErrors (tensorstore under orbax, Rust).
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")


def hold_workdir(workdir: Path, hosts: Hosts) -> RunLock | None:
    """Process 0's lock of ``workdir`` (None on the other processes); release it when done.

    Raises:
        RunLockedError: On every process, when a live run holds ``workdir``.
    """
    lock = RunLock(workdir, COMMAND) if hosts.index == 0 else None
    refused = ""
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as e:
            refused = str(e)
    if hosts.any_process(bool(refused)):
        raise RunLockedError(refused or f"{workdir} is in use by another run")
    return lock


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is ENOSPC / EDQUOT."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(
    path: Path,
    needed: int,
    cause: BaseException,
    *,
    about: bool = False,
    resume: str = "its newest complete checkpoint",
) -> DiskFullError:
    """The error of a write of ``needed`` bytes to ``path`` that found the disk full."""
    try:
        free = f"{shutil.disk_usage(_existing(path)).free:,}"
    except OSError:
        free = "?"
    errno_ = cause.errno if isinstance(cause, OSError) and cause.errno else errno.ENOSPC
    return DiskFullError(
        errno_,
        f"no space left to write {path}: it needs {'about ' if about else ''}{needed:,} bytes "
        f"and the filesystem has {free} bytes free; free some space (or choose another "
        f"workdir) and run the same command again: it resumes from {resume}",
    )


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (for the free space)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


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
