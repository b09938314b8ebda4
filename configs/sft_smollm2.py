"""Supervised fine-tuning of SmolLM2-135M-Instruct (embedded GGUF) on instruction data.

    python -m resofilter_jax.train --config configs/sft_smollm2.py \
        --config.data.path=selected.jsonl --config.workdir=runs/x

Data: any file resofilter_jax.data reads (jsonl/json of gsm8k, alpaca, query_response or
sharegpt rows, including the files written by `python -m resofilter_jax.select`); "" = the
embedded GSM8K test set. Re-running with the same workdir resumes from its newest checkpoint.
"""

import ml_collections

from resofilter_jax.parallel import distributed_config


def get_config() -> ml_collections.ConfigDict:
    """The whole run; every field can be overridden with --config.<field>=..."""
    c = ml_collections.ConfigDict()
    # Model: a HF directory, a .gguf file, or a hub id; "" = the embedded SmolLM2 GGUF.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "bfloat16"  # compute dtype (float32 for parity runs)
    c.model.param_dtype = "float32"  # master weights and optimizer state
    c.model.matmul_precision = "default"  # default | high | highest (README: Precision)
    # One lax.scan over the layers (stored stacked): same numbers, faster compiles, and with
    # train.remat below the backward pass keeps per-layer activations bounded.
    c.model.scan_layers = True
    # Attention backend: auto (picked by platform, packing, model features; logged and recorded
    # in run.json) | reference | xla | cudnn | pallas_gpu | splash (models/attention.py).
    c.model.attention = "auto"
    # Data.
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a file, a directory (HF save_to_disk / TFDS) or a dataset name
    c.data.reader = "auto"  # auto (by suffix) | json | jsonl | parquet | hf | tfds
    c.data.split = ""  # hf / tfds split ("" = train)
    c.data.format = "auto"  # auto | alpaca | query_response | gsm8k | sharegpt
    c.data.sharegpt_turns = "first"  # first | all (one example per human->gpt pair)
    c.data.fields = ml_collections.ConfigDict()  # key renames, e.g. {"instruction": "prompt"}
    c.data.allow_truncated = False  # accept a JSON array cut off near its end
    c.data.on_error = "status"  # status: unusable rows are dropped and counted | raise
    c.data.limit = 0  # train on the records of the first N input rows; 0 = all
    c.data.packing = False  # several examples per row (segment-masked attention)
    # Pack each step's rows into as few rows as hold them: the same examples and loss per step
    # as unpacked training (HF's loop), without computing the padding (segment-masked attention)
    c.data.pack_batches = False
    c.template = "chatml"  # chatml (SmolLM2's) | gemma | alpaca | none | chat
    c.max_length = 512  # right-truncation of prompt + response + EOS (the packed row length)
    c.min_bucket = 64  # batches are padded to min_bucket * 2**k or max_length
    # Batching and length of the run.
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16  # rows per optimizer step (all devices, all micro-batches)
    c.train.micro_batch_size = 0  # rows per forward/backward; 0 = batch_size (no accumulation)
    c.train.epochs = 1
    c.train.max_steps = 0  # > 0: this many optimizer steps instead of `epochs`
    c.train.stop_after_steps = 0  # > 0: end this invocation after that step (resume later)
    c.train.seed = 0  # row order of epoch e = permutation from (seed, e)
    c.train.shuffle = True
    # Per-layer rematerialisation: none | layer (keep each layer's input, recompute the layer in
    # the backward pass) | dots (also keep the matmul outputs). Same numbers, less memory.
    # "dots" with scanned layers: the step's temporaries at 8 x 512 rows of SmolLM2 are 4.1 GiB
    # (10.7 unscanned without remat), and the step 1.8x faster on a 2-core CPU, where the
    # unrematerialised backward pass is memory-bound (BENCHMARKS.md, "SFT train step").
    c.train.remat = "dots"
    # Held-out loss every N optimizer steps and at the last step (0 = off); needs eval.path.
    # Logged to metrics.jsonl as records {"step", "eval_loss", "eval_ppl", "eval_tokens",
    # "eval_time_s"} after the step's train record, TensorBoard eval/*, run.json "eval".
    # eval_time_s: how long the host waited for it (the device may overlap it with a step).
    c.train.eval_every = 0
    # The held-out file: read with data's reader settings (reader, split, format, fields,
    # on_error) and encoded like the training data (template, max_length; prompt masked, EOS
    # appended), one example per row even with data.packing. Loss = token-mean CE over the
    # response tokens (as the evaluate command's `loss` task), ppl = exp(loss).
    c.eval = ml_collections.ConfigDict()
    c.eval.path = ""  # required when train.eval_every > 0
    c.eval.limit = 0  # evaluate on the records of the first N input rows; 0 = all
    c.eval.batch_rows = 8  # rows per forward (rounded up to a multiple of the devices)
    # Optimizer: AdamW, torch-style global-norm clipping, linear warmup then decay.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.warmup_ratio = 0.03  # warmup steps = ceil(ratio * total steps)
    c.optim.warmup_steps = -1  # >= 0 overrides warmup_ratio
    c.optim.schedule = "cosine"  # cosine | linear | constant (after the warmup)
    c.optim.end_lr = 0.0
    c.optim.clip_norm = 1.0  # 0 = no clipping
    c.optim.decay = "matrices"  # weight decay on >= 2-D params only (HF Trainer) | all
    # Devices: data parallel over `data`, parameters + optimizer state sharded over `fsdp`.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by fsdp
    c.mesh.fsdp = 1
    c.ce_chunk = 256  # sequence chunk of the cross-entropy (bounds the logits' memory)
    # Checkpoints, logging, export.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200  # optimizer steps between checkpoints (the last step always)
    c.checkpoint.keep = 2
    c.checkpoint.use_async = True
    c.log_every = 1
    c.progress = True
    c.host = ml_collections.ConfigDict()
    c.host.workers = 0  # threads that tokenize; 0 = every core this process may use
    c.tensorboard = True  # only if tensorboardX or TensorFlow is installed
    c.export = ml_collections.ConfigDict()
    c.export.enabled = True  # write WORKDIR/hf/ when the run completes
    c.export.dtype = ""  # "" = the master weights' dtype | bfloat16 | float32
    c.workdir = "runs/sft_smollm2"
    c.compilation_cache_dir = "~/.cache/resofilter_jax/jax_cache"
    # Multi-process jobs (launch/README.md): explicit coordinator/count/id; SLURM and TPU pods
    # are detected. Every process runs the same command (and a restarted job resumes).
    c.distributed = distributed_config()
    # --config.dry_run=True: compile the train step for dry_run_topology (e.g. v5e-32,
    # 2x8xh100) on virtual CPU devices and print per-device memory; no data, no weights.
    c.dry_run = False
    c.dry_run_topology = "2x8xh100"
    c.dry_run_compiler = "auto"  # auto | tpu (XLA:TPU, needs libtpu) | cpu (virtual devices)
    return c
