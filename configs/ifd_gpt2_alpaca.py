"""Superfiltering's paper setting: IFD under GPT-2 on Alpaca-format data, max_length 1024.

    python -m resofilter_jax.score --config configs/ifd_gpt2_alpaca.py \
        --config.model.path=/path/to/gpt2 --config.data.path=alpaca_data.json

`model.path` is required: a local GPT-2 Hugging Face directory (config.json, safetensors,
tokenizer files), e.g. one saved with `save_pretrained`.
"""

import ml_collections

from resofilter_jax.parallel import distributed_config
from resofilter_jax.scoring.ifd_family import DEFAULT_INFORMATIVE_THRESHOLD


def get_config() -> ml_collections.ConfigDict:
    """The whole run; every field can be overridden with --config.<field>=..."""
    c = ml_collections.ConfigDict()
    c.method = "ifd"  # Superfiltering IFD
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # REQUIRED: local GPT-2 HF directory (no default weights ship for it)
    c.model.dtype = "float32"  # fp32 as in the reference
    c.model.param_dtype = "float32"
    c.model.matmul_precision = "highest"  # default | high | highest (README: Precision)
    c.model.scan_layers = True  # one lax.scan over the layers: half the compile time, same scores
    # Attention backend: auto (picked by platform, packing, model features; logged and recorded
    # in run.json) | reference | xla | cudnn | pallas_gpu | splash (models/attention.py).
    c.model.attention = "auto"
    c.require_model_path = True  # error clearly when model.path is empty
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # Alpaca JSON/JSONL (instruction, input, output); "" = embedded ShareGPT
    c.data.format = "alpaca"
    c.data.sharegpt_turns = "first"  # only used by the sharegpt format
    c.data.allow_truncated = False  # a cut-off JSON array is an error
    c.data.on_error = "status"  # status: bad rows become error:<reason> rows | raise
    c.data.limit = 0  # read the first N input rows; 0 = all
    c.data.fields = ml_collections.ConfigDict()  # source key renames
    c.template = "none"  # Superfiltering's prompt: "{instruction}\n{input}\n"
    c.max_length = 1024
    # The IFD family (docs/METHODS.md). `ifd` and `ifd_loss_ratio` are always written;
    # token_losses=True adds the per-token losses of both sequences (list columns
    # token_losses_direct / token_losses_condition) and T-SHIRT's informative-token IFD
    # `ifd_informative`, whose |delta_t| threshold (nats) is informative_threshold.
    c.ifd = ml_collections.ConfigDict()
    c.ifd.token_losses = False
    c.ifd.informative_threshold = DEFAULT_INFORMATIVE_THRESHOLD
    c.token_budget = 0  # padded tokens per batch; 0 = auto: 2048 on CPU, 16384 on GPU/TPU
    c.min_bucket = 64
    c.bucket_step = 0  # > 0: buckets double up to it, then grow by it (packed rows pad less at 0)
    c.pack = True  # several sequences per row (segment masks): far less padding, same scores
    c.ce_chunk = 128  # CE sequence chunk
    c.num_devices = 0  # 0 = all local devices
    c.host = ml_collections.ConfigDict()
    c.host.workers = 0  # threads that tokenize; 0 = every core this process may use
    c.host.prefetch = 1  # shards prepared ahead of the device in a background thread (0: off)
    # Encoded shards, keyed by tokenizer, template, max_length and data ("" = no cache):
    # a re-run, another model with the same tokenizer or another dtype skips tokenization.
    c.host.encoded_cache_dir = "~/.cache/resofilter_jax/encoded"
    c.shard_size = 2048  # rows per output shard (resume unit)
    c.output_dir = "outputs/ifd_gpt2_alpaca"
    c.overwrite = False
    c.progress = True
    c.compilation_cache_dir = "~/.cache/resofilter_jax/jax_cache"  # "" = off
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
