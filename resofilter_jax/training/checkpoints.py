"""Orbax checkpoints of a training run: sharded params + optimizer state, and the data position.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``. ``state`` holds ``{"params",
"opt_state"}`` (restored straight into their shardings); ``data`` is JSON with the global
step, epoch, batch within the epoch, permutation seed and a fingerprint of the training rows
(see :meth:`resofilter_jax.training.sft_data.BatchPlan.state`).

Only complete checkpoints are ever restored. Orbax writes ``<step>.orbax-checkpoint-tmp/``
and renames it to ``<step>/`` once every file is written; a directory with the temporary
suffix is never listed as a step (so a run killed mid-save, even in the background thread of
an asynchronous save, resumes from the previous complete one) and is deleted when the next
run opens the directory. Old checkpoints (``keep``) are deleted only after a newer one is
complete. A save that runs out of space raises :class:`~resofilter_jax.data.atomic.DiskFullError`
naming the checkpoint and the bytes it needs, and its temporary directory is removed.

Multi-process jobs: every process calls save/restore with the same globally sharded arrays
(each writes the blocks of its own devices); process 0, orbax's primary host, writes the
JSON item and the metadata and renames the finished directory. The directory must be on a
filesystem every process sees.

Parameters are keyed by their names as stored: with ``scan_layers`` the decoder layers are
stored stacked (``model.layers.*.x`` [L, ...]), so a checkpoint records its storage. Resuming
it with the other ``scan_layers`` setting raises :class:`LayerStorageMismatchError` (no
conversion: the optimizer state mirrors the same names) saying which setting wrote it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from resofilter_jax.data.atomic import disk_full_error, is_disk_full
from resofilter_jax.models.stacking import is_stacked_name

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name of a checkpoint still being written
# Test hook: "N" = SIGKILL this process while checkpoint N is finalized (all its files are
# written, the directory is not yet renamed): a crash in the middle of an (async) save.
KILL_IN_SAVE_ENV = "RESOFILTER_TEST_KILL_IN_SAVE"


class LayerStorageMismatchError(ValueError):
    """A checkpoint's layer storage (stacked or per layer) differs from the run's."""


class Checkpointer:
    """Saves every ``every`` steps, keeps the last ``keep``, restores the latest."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, use_async: bool = True):
        """Opens (creating) ``directory``; deletes what killed runs left half-written.

        Args:
            every: save at steps that are multiples of ``every`` (0: only forced saves).
            keep: number of most recent checkpoints kept (0: all).
            use_async: write in a background thread after the device-to-host copy.
        """
        self.directory = Path(directory).absolute()
        self.every = int(every)
        self._pending: tuple[int, int] | None = None  # (step, bytes) of a save in flight
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            save_interval_steps=1,  # the interval is applied by `should_save`
            enable_async_checkpointing=use_async,
            create=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
            temporary_path_class=_kill_hook_path_class(),  # None: orbax's default
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``step`` (the number of optimizer steps done) is a periodic save point."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step: int, state: dict[str, Any], data: dict[str, Any]) -> None:
        """Writes ``state`` (a pytree of arrays) and ``data`` (JSON) as checkpoint ``step``.

        Raises:
            DiskFullError: If this save, or the previous one still in flight, ran out of space.
        """
        if self._manager.latest_step() == step:
            return
        self.wait()  # a failed background save is reported under its own step
        needed = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)
                ),
                force=True,
            )
        except Exception as e:
            self._failed(step, needed, e)
            raise
        self._pending = (step, needed)

    def restore(self, step: int, target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, data) of checkpoint ``step``; ``target``: sharded ShapeDtypeStruct tree.

        Raises:
            LayerStorageMismatchError: If the checkpoint stores the decoder layers stacked and
                ``target`` per layer, or the other way round (``scan_layers`` differs).
        """
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                ),
            )
        except ValueError as e:
            self._check_layer_storage(step, target, e)
            raise
        return out["state"], dict(out["data"])

    def _check_layer_storage(self, step: int, target: dict[str, Any], error: Exception) -> None:
        """Raises LayerStorageMismatchError when checkpoint ``step`` and ``target`` store the
        decoder layers differently (a failed restore's likely cause); otherwise returns."""
        try:
            meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
            saved = list(getattr(meta, "item_metadata", meta)["params"])
        except Exception:  # noqa: BLE001 - no readable metadata: the original error stands
            return
        wanted = list(target.get("params", {}))
        was, now = any(map(is_stacked_name, saved)), any(map(is_stacked_name, wanted))
        if was == now:
            return

        def storage(stacked: bool) -> str:
            return "stacked (scan_layers=True)" if stacked else "per layer (scan_layers=False)"

        raise LayerStorageMismatchError(
            f"checkpoint {self.directory / str(step)} stores the decoder layers "
            f"{storage(was)} but this run stores them {storage(now)}; resume it with "
            f"--config.model.scan_layers={was}"
        ) from error

    def wait(self) -> None:
        """Blocks until background saves are on disk.

        Raises:
            DiskFullError: If the save in flight ran out of space.
        """
        pending, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if pending is not None:
                self._failed(*pending, e)
            raise

    def close(self) -> None:
        """Waits and releases the manager."""
        self.wait()
        self._manager.close()

    def _failed(self, step: int, needed: int, error: Exception) -> None:
        """Turns a full disk during save ``step`` into a DiskFullError (other errors pass)."""
        if not is_disk_full(error):
            return
        previous = [s for s in self._manager.all_steps() if s < step]
        resume = f"checkpoint {max(previous)}" if previous else "the start"
        with contextlib.suppress(Exception):  # its threads end; the run stops here anyway
            self._manager.close()
        if jax.process_count() == 1:  # frees the space now (else the next run deletes it)
            for tmp in self.directory.glob(f"{step}{TMP_SUFFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(
            self.directory / str(step), needed, error, how="about", resume=f"from {resume}"
        ) from error


def _kill_hook_path_class() -> type | None:
    """Orbax's temporary-path class with the ``RESOFILTER_TEST_KILL_IN_SAVE`` hook, or None."""
    hook = os.environ.get(KILL_IN_SAVE_ENV, "")
    if not hook:
        return None
    victim = str(int(hook))
    base = ocp.path.atomicity.AtomicRenameTemporaryPath  # orbax's default on a local disk

    class KillBeforeRename(base):  # type: ignore[misc, valid-type]
        async def finalize(self, *args: Any, **kwargs: Any) -> Any:
            if self.get_final().name == victim:
                os.kill(os.getpid(), signal.SIGKILL)
            return await super().finalize(*args, **kwargs)

    return KillBeforeRename
