"""Supervised fine-tuning on (selected) instruction data: data rows, optimizer, step, checkpoints.

``resofilter_jax.train`` is the command line; the modules here are its parts:

* ``sft_data``: examples -> rows (optionally packed), the resumable epoch/batch plan.
* ``optim``: torch-style clipping, AdamW with a weight-decay mask, warmup + decay schedules.
* ``trainer``: the jit-compiled, sharded train step with token-weighted accumulation.
* ``checkpoints``: orbax checkpoints of params, optimizer state and the data position.
* ``metrics``: console / JSONL / TensorBoard logging.
* ``multihost``: multi-process jobs: each process's rows of a batch, gathering for export.
"""
