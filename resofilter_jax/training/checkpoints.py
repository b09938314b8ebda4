"""Orbax checkpoints of a training run: sharded params + optimizer state, and the data position.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``. ``state`` holds ``{"params",
"opt_state"}`` (restored straight into their shardings); ``data`` is JSON with the global
step, epoch, batch within the epoch, permutation seed and a fingerprint of the training rows
(see :meth:`resofilter_jax.training.sft_data.BatchPlan.state`). A checkpoint directory is
written under a temporary name and renamed when complete, so a run killed mid-save resumes
from the previous complete one.

Multi-process jobs: every process calls save/restore with the same globally sharded arrays
(each writes the blocks of its own devices); process 0, orbax's primary host, writes the
JSON item and the metadata and renames the finished directory. The directory must be on a
filesystem every process sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every ``every`` steps, keeps the last ``keep``, restores the latest."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, use_async: bool = True):
        """Opens (creating) ``directory``.

        Args:
            every: save at steps that are multiples of ``every`` (0: only forced saves).
            keep: number of most recent checkpoints kept (0: all).
            use_async: write in a background thread after the device-to-host copy.
        """
        self.directory = Path(directory).absolute()
        self.every = int(every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            save_interval_steps=1,  # the interval is applied by `should_save`
            enable_async_checkpointing=use_async,
            create=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``step`` (the number of optimizer steps done) is a periodic save point."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step: int, state: dict[str, Any], data: dict[str, Any]) -> None:
        """Writes ``state`` (a pytree of arrays) and ``data`` (JSON) as checkpoint ``step``."""
        if self._manager.latest_step() == step:
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)
            ),
            force=True,
        )

    def restore(self, step: int, target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, data) of checkpoint ``step``; ``target``: sharded ShapeDtypeStruct tree."""
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["data"])

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
