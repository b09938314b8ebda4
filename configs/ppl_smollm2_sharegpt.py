"""Response perplexity of ShareGPT first turns under SmolLM2-135M-Instruct (embedded default).

    python -m resofilter_jax.perplexity --config configs/ppl_smollm2_sharegpt.py \
        --config.limit=64 --config.output_dir=outputs/ppl
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The whole run; every field can be overridden with --config.<field>=..."""
    c = ml_collections.ConfigDict()
    # Model: a HF directory, a .gguf file, or a hub id; "" = the embedded SmolLM2 GGUF.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"
    # Data: a file or dataset; "" = the embedded ShareGPT V3 file (truncated near its end).
    c.data = ml_collections.ConfigDict()
    c.data.path = ""
    c.data.format = "sharegpt"  # alpaca | query_response | sharegpt | gsm8k | auto
    c.data.sharegpt_turns = "first"  # first | all
    c.data.allow_truncated = True  # the shipped ShareGPT file is cut off near its end
    c.data.on_error = "status"  # raise | status (bad rows become status rows)
    c.template = "none"  # prompt template (Superfiltering's "none")
    c.max_length = 1024
    c.limit = 64  # first N rows; 0 = all
    c.token_budget = 16384  # tokens per batch (rows x padded length)
    c.min_bucket = 64
    c.chunk = 128  # sequence chunk of the cross-entropy (bounds [batch, chunk, vocab] logits)
    c.output_dir = "outputs/ppl_smollm2_sharegpt"
    return c
