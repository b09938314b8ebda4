"""The ResoFilter paper's setting: gemma-2-2b resonance scores of MetaMathQA (paths required).

    python -m resofilter_jax.score --config configs/reso_gemma2_metamath.py \
        --config.model.path=/models/gemma-2-2b --config.data.path=/data/MetaMathQA-395K.json
"""

import importlib.util
from pathlib import Path

import ml_collections


def _base() -> ml_collections.ConfigDict:
    path = Path(__file__).with_name("reso_smollm2_gsm8k.py")
    spec = importlib.util.spec_from_file_location("reso_smollm2_gsm8k", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config() -> ml_collections.ConfigDict:
    """gemma-2-2b, MetaMathQA query/response, Gemma template, max_length 768, last-3 up_proj."""
    c = _base()
    c.require_model_path = True  # gemma-2-2b is not embedded: a local HF dir or .gguf
    c.require_data_path = True  # MetaMathQA is not embedded: a local JSON/JSONL file
    c.model.path = ""
    c.model.dtype = "float32"
    c.model.matmul_precision = "highest"  # default | high | highest (README: Precision)
    c.data.path = ""
    c.data.format = "query_response"
    c.template = "gemma"
    c.max_length = 768
    c.resonance.params_type = "mlp.up_proj.weight"
    c.resonance.last_k = 3
    # Gradient features (LESS-style): e.g. --config.features.projection_dim=8192; 0 = off.
    c.features.projection_dim = 0
    c.features.projection_seed = 0
    c.features.projection_kind = "rademacher"
    c.token_budget = 8192
    c.shard_size = 2048
    c.output_dir = "outputs/reso_gemma2_metamath"
    return c
