"""ResoFilter's fine-tuning setting: gemma-2-2b on (selected) MetaMathQA (paths required).

    python -m resofilter_jax.train --config configs/sft_gemma2_metamath.py \
        --config.model.path=/models/gemma-2-2b --config.data.path=selected.json \
        --config.workdir=runs/gemma2_metamath

Published setting: lr 1e-5, weight decay 0.1, beta2 0.95, warmup ratio 0.01, cosine decay,
1 epoch, bf16, max_length 768, Gemma template. The batch size is this project's choice (set
yours with --config.train.batch_size / micro_batch_size).
"""

import importlib.util
from pathlib import Path

import ml_collections

from resofilter_jax.parallel import distributed_config


def _base() -> ml_collections.ConfigDict:
    path = Path(__file__).with_name("sft_smollm2.py")
    spec = importlib.util.spec_from_file_location("sft_smollm2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config() -> ml_collections.ConfigDict:
    """gemma-2-2b, MetaMathQA query/response, Gemma template, the paper's optimizer."""
    c = _base()
    c.require_model_path = True  # gemma-2-2b is not embedded: a local HF dir (or .gguf)
    c.require_data_path = True  # MetaMathQA is not embedded: a local JSON/JSONL file
    c.model.path = ""  # placeholder: --config.model.path=/path/to/gemma-2-2b
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.matmul_precision = "default"  # default | high | highest (README: Precision)
    c.data.path = ""
    c.data.format = "auto"  # query_response for MetaMathQA; select's output keeps it
    c.template = "gemma"
    c.max_length = 768
    c.train.batch_size = 64
    c.train.micro_batch_size = 8
    c.train.epochs = 1
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.warmup_ratio = 0.01
    c.optim.schedule = "cosine"
    c.optim.clip_norm = 1.0
    c.checkpoint.every = 500
    c.workdir = "runs/sft_gemma2_metamath"
    c.distributed = distributed_config()  # set by _base() too; kept explicit for this recipe
    return c
