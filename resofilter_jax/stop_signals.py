"""Graceful stops: SIGTERM / SIGINT ask a long job to stop at its next safe point.

Preemption (SIGTERM) and Ctrl-C (SIGINT) set a flag that the job polls at its safe points
(the scorer after the shard in flight is written, the trainer after a checkpoint is saved);
it then raises :class:`Interrupted`, whose message says how to resume, and the command exits
with ``128 + signal``. A second signal stops at once: it raises ``KeyboardInterrupt``
(SIGINT) or ``SystemExit(128 + signal)`` (SIGTERM) in the main thread, which unwinds through
the atomic writers (their temporary files are removed), so even then only complete files
are left.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("resofilter_jax")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
    """A job stopped at a safe point because of a signal; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while active, the first SIGTERM/SIGINT only sets :attr:`signum`.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, what: str = "the shard in flight is written") -> None:
        self.what = what
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    @property
    def name(self) -> str:
        """``SIGTERM`` / ``SIGINT`` (or "" when no signal came)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is not None:  # the second signal: stop now
            log.warning("%s received again: stopping now", signal.Signals(signum).name)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        log.warning(
            "%s received: stopping once %s (send it again to stop at once)",
            signal.Signals(signum).name,
            self.what,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


__all__ = ["Interrupted", "StopSignals"]
