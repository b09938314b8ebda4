"""Evaluate SmolLM2-135M-Instruct (embedded GGUF, or a trained WORKDIR/hf) on GSM8K rows.

    python -m resofilter_jax.evaluate --config configs/eval_smollm2_gsm8k.py \
        --config.model.path=runs/x/hf --config.data.limit=100 --config.output_dir=runs/x/eval

Held-out loss/perplexity of the responses (the training encoding) and GSM8K exact match by
greedy decoding. Data: any file resofilter_jax.data reads; "" = the embedded GSM8K test set.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The whole run; every field can be overridden with --config.<field>=..."""
    c = ml_collections.ConfigDict()
    c.tasks = "loss,gsm8k"  # comma-separated: loss | gsm8k
    # Model: a HF directory (e.g. WORKDIR/hf written by train), a .gguf file, or a hub id;
    # "" = the embedded SmolLM2 GGUF.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
    c.model.param_dtype = "float32"
    c.model.matmul_precision = "highest"  # default | high | highest (README: Precision)
    # Attention backend: auto (picked by platform, packing, model features; logged and recorded
    # in eval.json) | reference | xla | cudnn | pallas_gpu | splash (models/attention.py).
    c.model.attention = "auto"
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a file, a directory (HF save_to_disk / TFDS) or a dataset name
    c.data.reader = "auto"  # auto (by suffix) | json | jsonl | parquet | hf | tfds
    c.data.split = ""  # hf / tfds split ("" = train)
    c.data.format = "auto"  # auto | alpaca | query_response | gsm8k | sharegpt
    c.data.sharegpt_turns = "first"
    c.data.fields = ml_collections.ConfigDict()
    c.data.allow_truncated = False
    c.data.on_error = "status"  # unusable rows are counted, not evaluated | raise
    c.data.limit = 0  # the first N input rows; 0 = all
    c.template = "chatml"  # must be the template the model was trained with
    c.max_length = 512  # truncation of prompt + response for the loss
    c.min_bucket = 64
    c.loss = ml_collections.ConfigDict()
    c.loss.batch_rows = 16
    c.generate = ml_collections.ConfigDict()
    c.generate.max_new_tokens = 256
    c.generate.batch_size = 16
    c.generate.prompt_bucket = 64  # prompts are left-padded to a multiple of this
    c.output_dir = "outputs/eval_smollm2_gsm8k"
    c.compilation_cache_dir = "~/.cache/resofilter_jax/jax_cache"  # "" = off
    c.progress = True
    return c
