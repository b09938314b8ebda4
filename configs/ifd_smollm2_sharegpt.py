"""Superfiltering IFD scores of ShareGPT first turns under SmolLM2-135M-Instruct (embedded).

    python -m resofilter_jax.score --config configs/ifd_smollm2_sharegpt.py \
        --config.data.limit=256 --config.output_dir=outputs/ifd_smollm2_sharegpt
"""

import ml_collections

from resofilter_jax.parallel import distributed_config
from resofilter_jax.scoring.ifd_family import DEFAULT_INFORMATIVE_THRESHOLD


def get_config() -> ml_collections.ConfigDict:
    """The whole run; every field can be overridden with --config.<field>=..."""
    c = ml_collections.ConfigDict()
    # ifd (Superfiltering) | rifd (reverse IFD; rifd_smollm2_sharegpt.py) | resonance
    # (ResoFilter; see reso_smollm2_gsm8k.py)
    c.method = "ifd"
    # Model: a HF directory, a .gguf file, or a hub id; "" = the embedded SmolLM2 GGUF.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"  # compute dtype: float32 (parity) | bfloat16 (speed)
    c.model.param_dtype = "float32"  # storage dtype of the parameters
    c.model.matmul_precision = "highest"  # default | high | highest (README: Precision)
    c.model.scan_layers = True  # one lax.scan over the layers: half the compile time, same scores
    # Attention backend: auto (picked by platform, packing, model features; logged and recorded
    # in run.json) | reference | xla | cudnn | pallas_gpu | splash (models/attention.py).
    c.model.attention = "auto"
    # Data: a file or dataset; "" = the embedded ShareGPT V3 file (truncated near its end).
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a file, a directory (HF save_to_disk / TFDS) or a dataset name
    c.data.reader = "auto"  # auto (by suffix) | json | jsonl | parquet | hf | tfds
    c.data.split = ""  # hf / tfds split ("" = train)
    c.data.format = "sharegpt"  # alpaca | query_response | sharegpt | gsm8k | auto
    c.data.sharegpt_turns = "first"  # first | all (one row per human->gpt pair, with `turn`)
    c.data.allow_truncated = True  # the shipped ShareGPT file is cut off near its end
    c.data.on_error = "status"  # status: bad rows become error:<reason> rows | raise
    c.data.limit = 0  # read the first N input rows; 0 = all
    c.data.fields = ml_collections.ConfigDict()  # source key renames, e.g. {"output": "answer"}
    c.template = "none"  # prompt template; "none" = Superfiltering's "{instruction}\n{input}\n"
    c.max_length = 1024  # Superfiltering's max_length (truncation rules: docs/DESIGN.md §3.1)
    # The IFD family (docs/METHODS.md). `ifd` and `ifd_loss_ratio` are always written;
    # token_losses=True adds the per-token losses of both sequences (list columns
    # token_losses_direct / token_losses_condition) and T-SHIRT's informative-token IFD
    # `ifd_informative`, whose |delta_t| threshold (nats) is informative_threshold.
    c.ifd = ml_collections.ConfigDict()
    c.ifd.token_losses = False
    c.ifd.informative_threshold = DEFAULT_INFORMATIVE_THRESHOLD
    # Batching (does not change scores): padded tokens per batch, smallest length bucket.
    c.token_budget = 0  # 0 = auto: 2048 on CPU (less padding), 16384 on GPU/TPU
    c.min_bucket = 64
    c.bucket_step = 0  # > 0: buckets double up to it, then grow by it (packed rows pad less at 0)
    c.pack = True  # several sequences per row (segment masks): far less padding, same scores
    c.ce_chunk = 128  # sequence chunk of the cross-entropy (bounds [batch, chunk, vocab] logits)
    c.num_devices = 0  # data-parallel over the first N local devices; 0 = all
    c.host = ml_collections.ConfigDict()
    c.host.workers = 0  # threads that tokenize; 0 = every core this process may use
    c.host.prefetch = 1  # shards prepared ahead of the device in a background thread (0: off)
    # Encoded shards, keyed by tokenizer, template, max_length and data ("" = no cache):
    # a re-run, another model with the same tokenizer or another dtype skips tokenization.
    c.host.encoded_cache_dir = "~/.cache/resofilter_jax/encoded"
    # Outputs: shards of `shard_size` rows are written as they finish; a re-run with the same
    # settings computes only missing shards. overwrite=True discards a different earlier run.
    c.shard_size = 2048
    c.output_dir = "outputs/ifd_smollm2_sharegpt"
    c.overwrite = False
    c.progress = True  # tqdm progress bar
    # JAX persistent compilation cache ("" = off).
    c.compilation_cache_dir = "~/.cache/resofilter_jax/jax_cache"
    # Multi-process jobs (launch/README.md): explicit coordinator/count/id; SLURM and TPU pods
    # are detected. Not part of the fingerprint: a job may resume with another process count.
    c.distributed = distributed_config()
    # --config.dry_run=True: compile the step for dry_run_topology (e.g. v5e-32,
    # 2xv5e-16, 2x8xh100, v5p:4x4x12) and print per-device memory and a step-time ESTIMATE;
    # no data, no weights. TPU targets compile with XLA:TPU when libtpu is installed
    # (pip install 'resofilter_jax[tpu]'), others on virtual CPU devices.
    c.dry_run = False
    c.dry_run_topology = "2x8xh100"
    c.dry_run_compiler = "auto"  # auto | tpu (XLA:TPU, needs libtpu) | cpu (virtual devices)
    return c
