"""ResoFilter resonance scores of the GSM8K test set under SmolLM2-135M-Instruct (embedded).

    python -m resofilter_jax.score --config configs/reso_smollm2_gsm8k.py \
        --config.data.limit=64 --config.output_dir=outputs/reso_smollm2_gsm8k
"""

import ml_collections

from resofilter_jax.parallel import distributed_config


def resonance_config() -> ml_collections.ConfigDict:
    """The resonance settings: which matrices, which one-step update, how to aggregate."""
    r = ml_collections.ConfigDict()
    r.params_type = "mlp.up_proj.weight"  # a parameter type inside a decoder layer
    r.last_k = 3  # of the last k decoder layers (0 = all layers)
    r.pattern = ""  # a regex over HF parameter names instead of params_type/last_k
    r.rule = "adamw"  # adamw | adam | sgd (first step from fresh optimizer state)
    r.lr = 1e-5
    r.eps = 1e-8
    r.weight_decay = 0.01  # -1 = the rule's torch default (adamw 0.01, adam/sgd 0)
    r.aggregate = "mean"  # score = mean | sum | max over the chosen matrices of mean |delta|
    r.memory_budget_gb = 4.0  # per device for per-example gradients + activations of a step
    r.micro = 0  # rows per device per step; 0 = as many as memory_budget_gb allows
    r.max_segments = 8  # most examples packed into one row (with pack=True)
    return r


def features_config() -> ml_collections.ConfigDict:
    """Gradient features: each example's gradient of the chosen matrices, randomly projected.

    The gradient is the concatenation (in the order of the chosen parameters, each flattened
    row-major) of the fp32 per-example gradients; it is projected to K dims by a random
    matrix generated on the fly from the seed (never stored) and written as float16
    OUTPUT_DIR/projections/proj-<shard>.npy + index.json (load with
    resofilter_jax.scoring.projection.load_projections).
    """
    f = ml_collections.ConfigDict()
    f.projection_dim = 0  # K; 0 = off
    f.projection_seed = 0  # same seed + model + parameters = comparable projections
    f.projection_kind = "rademacher"  # rademacher (+-1/sqrt(K)) | gaussian (N(0, 1/K))
    f.projection_block = 0  # rows of the matrix generated per step; 0 = min(8192, 2**24 // K)
    return f


def get_config() -> ml_collections.ConfigDict:
    """The whole run; every field can be overridden with --config.<field>=..."""
    c = ml_collections.ConfigDict()
    c.method = "resonance"
    # Model: a HF directory, a .gguf file, or a hub id; "" = the embedded SmolLM2 GGUF.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"  # compute dtype: float32 (parity) | bfloat16 (speed)
    c.model.param_dtype = "float32"
    c.model.matmul_precision = "highest"  # default | high | highest (README: Precision)
    c.model.scan_layers = False  # keep off: a scan would take the backward pass through all layers
    # Attention backend: auto (picked by platform, packing, model features; logged and recorded
    # in run.json) | reference | xla | cudnn | pallas_gpu | splash (models/attention.py).
    c.model.attention = "auto"
    # Data: a file or dataset; "" = the embedded GSM8K test set (1319 rows).
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a file, a directory (HF save_to_disk / TFDS) or a dataset name
    c.data.reader = "auto"  # auto (by suffix) | json | jsonl | parquet | hf | tfds
    c.data.split = ""  # hf / tfds split ("" = train)
    c.data.format = "gsm8k"  # alpaca | query_response | sharegpt | gsm8k | auto
    c.data.sharegpt_turns = "first"
    c.data.allow_truncated = False
    c.data.on_error = "status"  # status: bad rows become error:<reason> rows | raise
    c.data.limit = 0  # read the first N input rows; 0 = all
    c.data.fields = ml_collections.ConfigDict()
    c.template = "chatml"  # none | alpaca | gemma | chatml | chat
    c.max_length = 768  # right-truncation of prompt + response + EOS
    c.resonance = resonance_config()
    c.features = features_config()
    # Batching (does not change scores beyond fp32 rounding): padded tokens per batch.
    # 0 = auto: 2048 on CPU, 16384 on GPU/TPU (memory per step is capped by
    # resonance.memory_budget_gb either way). On 64 GSM8K rows the packed rows pad 12,446 real
    # tokens to 14,848 with these settings, against 18,688 with the earlier 8192 / step 128.
    c.token_budget = 0
    c.min_bucket = 64
    c.bucket_step = 0  # > 0: buckets double up to it, then grow by it (packed rows pad less at 0)
    # Several examples per row; one backward pass gives each its own gradient (same results).
    c.pack = True
    c.num_devices = 0  # data-parallel over the first N local devices; 0 = all
    c.host = ml_collections.ConfigDict()
    c.host.workers = 0  # threads that tokenize; 0 = every core this process may use
    c.host.prefetch = 1  # shards prepared ahead of the device in a background thread (0: off)
    # Encoded shards, keyed by tokenizer, template, max_length and data ("" = no cache):
    # a re-run, another model with the same tokenizer or another dtype skips tokenization.
    c.host.encoded_cache_dir = "~/.cache/resofilter_jax/encoded"
    c.shard_size = 512
    c.output_dir = "outputs/reso_smollm2_gsm8k"
    c.overwrite = False
    c.progress = True
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
