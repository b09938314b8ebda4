"""One live run per output directory: a lock file naming its holder.

``OUTPUT_DIR/.resofilter.lock`` holds the holder's host, pid, process start time, command
and start time; a thread refreshes its mtime (the heartbeat) while the run lives. A second
run on the same directory is refused with a message naming the holder. A lock whose holder
is gone is taken over with a warning: on the same host when its pid no longer runs (or runs
another process: the start time differs), on another host when its heartbeat is older than
``stale_after_s``. Creating the lock is atomic (``O_CREAT | O_EXCL``) and take-overs are
serialised by ``flock`` on a guard file, so two runs starting together cannot both win.
In a multi-process job only process 0 takes the lock: one job holds it, not each process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK_NAME = ".resofilter.lock"
GUARD_NAME = ".resofilter.lock.guard"
log = logging.getLogger("resofilter_jax")


class RunLockedError(RuntimeError):
    """The output directory is held by another live run."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None when unknown/gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """``host H, pid P, started T (command C)``."""
    started = holder.get("started", "?")
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {started} "
        f"(command: {holder.get('command', '?')})"
    )


class RunLock:
    """The lock of ``out_dir`` for one run; use as a context manager."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        command: str = "",
        *,
        stale_after_s: float = 600.0,
        heartbeat_s: float = 30.0,
    ) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.command = command or " ".join(sys.argv[:1] + sys.argv[1:3])
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _holder(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _start_ticks(os.getpid()),
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": self.token,
        }

    def _stale(self, holder: dict[str, Any]) -> str:
        """Why the lock's holder is gone ("" when it may be alive)."""
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if pid == os.getpid() and holder.get("token") != self.token:
                return ""  # another run of this very process (e.g. a library caller)
            if not _alive(pid):
                return f"pid {pid} no longer runs"
            ticks = _start_ticks(pid)
            if holder.get("pid_start") is not None and ticks is not None:
                if ticks != holder["pid_start"]:
                    return f"pid {pid} is now another process"
            return ""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        if age > self.stale_after_s:
            return f"its heartbeat stopped {age:.0f} s ago (> {self.stale_after_s:.0f} s)"
        return ""

    def acquire(self) -> RunLock:
        """Takes the lock, or raises :class:`RunLockedError` naming the live holder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / GUARD_NAME, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # serialises the check and any take-over
            try:
                if self.path.exists():
                    try:
                        holder = json.loads(self.path.read_text())
                    except (OSError, ValueError):
                        holder = {}
                    why = self._stale(holder) if holder else "its lock file is unreadable"
                    if not why:
                        raise RunLockedError(
                            f"{self.dir} is in use by another run: {describe(holder)}. Wait "
                            f"for it to finish; if that run is gone for good, delete {self.path}"
                        )
                    log.warning(
                        "taking over the lock of %s from a run that is gone (%s): %s",
                        self.dir,
                        why,
                        describe(holder),
                    )
                    self.path.unlink(missing_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump(self._holder(), f)
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="resofilter-lock")
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still this run's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold_for_job(
    out_dir: str | os.PathLike[str],
    command: str,
    *,
    lead: bool,
    any_process: Callable[[bool], bool],
) -> RunLock | None:
    """The lead process's lock of ``out_dir`` for a whole (multi-process) job.

    ``any_process(flag)``: whether any process of the job passed True (a collective every
    process calls). Returns the lock on the lead process, None elsewhere; release it when
    the job is done.

    Raises:
        RunLockedError: On every process, when a live run holds ``out_dir``.
    """
    lock = RunLock(out_dir, command) if lead else None
    refused = ""
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as e:
            refused = str(e)
    if any_process(bool(refused)):
        raise RunLockedError(refused or f"{out_dir} is in use by another run")
    return lock


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "describe", "hold_for_job"]
