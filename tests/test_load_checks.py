"""Load-time checks (models/checks.py): NaN/Inf weights, a tokenizer with ids beyond the model's
vocabulary, and a max_length beyond the model's positions are clear errors from `load_model`
and from the score command before any shard is written; good models still load."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from support.data import build_tokenizer, write_jsonl
from support.gguf_writer import CASES, gguf_tensors, write_gguf, write_metadata
from support.models import save_tiny_model
from support.scoring import alpaca_rows
from support.training import char_tokenizer, tiny_hf

from resofilter_jax.configuration import load_config
from resofilter_jax.models import checks
from resofilter_jax.models.checks import (
    BadWeightsError,
    MaxLengthError,
    TokenizerMismatchError,
    check_finite,
    check_tokenizer,
    finite_flags,
)
from resofilter_jax.models.loading import load_model
from resofilter_jax.scoring import pipeline as score

ROOT = Path(__file__).resolve().parents[1]
NAN_PARAM, INF_PARAM = "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.weight"
POSITIONS = 64  # the tiny GPT-2's n_positions


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 whose vocabulary is exactly its tokenizer's (531 ids)."""
    path = tmp_path_factory.mktemp("good") / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), path)
    return path


@pytest.fixture(scope="module")
def nan_dir(good_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good model with 3 NaN in one weight and +Inf, -Inf in another."""
    path = tmp_path_factory.mktemp("nan") / "gpt2"
    shutil.copytree(good_dir, path)
    (weights,) = path.glob("*.safetensors")
    state = load_file(weights)
    state[NAN_PARAM].reshape(-1)[[0, 7, 100]] = np.nan
    state[INF_PARAM].reshape(-1)[[3, 5]] = [np.inf, -np.inf]
    save_file(state, weights, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def big_tokenizer_dir(good_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good model saved with a tokenizer that has two tokens more than its embedding."""
    path = tmp_path_factory.mktemp("bigtok") / "gpt2"
    shutil.copytree(good_dir, path)
    tok = build_tokenizer("none")
    tok.add_tokens(["<extra_0>", "<extra_1>"])
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", alpaca_rows(6, seed=3))


def test_good_model_loads(good_dir: Path) -> None:
    lm = load_model(good_dir, max_length=POSITIONS)
    assert len(lm.tokenizer) == lm.config.vocab_size == 531
    assert lm.config.max_position_embeddings == POSITIONS


def test_nan_and_inf_weights_are_named(nan_dir: Path) -> None:
    with pytest.raises(BadWeightsError) as err:
        load_model(nan_dir)
    msg = str(err.value)
    assert str(nan_dir) in msg and "2 of " in msg
    assert f"{NAN_PARAM} (3 NaN, 0 Inf of 16384)" in msg
    assert f"{INF_PARAM} (0 NaN, 2 Inf of 4096)" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "jit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_scan_paths_find_bad_weights(
    nan_dir: Path, host: bool, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "check_finite", lambda *a, **k: None)  # load the bad weights
    lm = load_model(nan_dir, param_dtype=dtype, tokenizer=False)
    with pytest.raises(BadWeightsError, match=rf"{NAN_PARAM} \(3 NaN.*{INF_PARAM} \(0 NaN, 2 Inf"):
        check_finite(lm.model, "m", host=host)


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "jit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_finite_flags_edge_values(host: bool, dtype: str) -> None:
    """The largest finite value, denormals and -0 are finite; NaN, +Inf and -Inf are not."""
    big = float(jnp.finfo(dtype).max)
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    arrays = [jnp.asarray([big, -big, tiny, -0.0, 1.0], dtype)] + [
        jnp.asarray([1.0, bad, 2.0], dtype) for bad in (np.nan, np.inf, -np.inf)
    ]
    assert finite_flags(arrays, host=host) == [True, False, False, False]


def test_tokenizer_beyond_the_vocabulary(big_tokenizer_dir: Path) -> None:
    with pytest.raises(TokenizerMismatchError) as err:
        load_model(big_tokenizer_dir)
    msg = str(err.value)
    assert str(big_tokenizer_dir) in msg
    assert "533 tokens" in msg and "only 531 rows (vocab_size=531)" in msg
    load_model(big_tokenizer_dir, tokenizer=False)  # the weights themselves are fine


def test_smaller_tokenizer_than_vocabulary_is_fine(tmp_path: Path) -> None:
    """Padding rows (model vocab 128, tokenizer 100 ids) are normal."""
    tiny_hf("llama", layers=1).save_pretrained(tmp_path, safe_serialization=True)
    char_tokenizer().save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert len(lm.tokenizer) < lm.config.vocab_size


class _Tokenizer:
    """A tokenizer of 10 ids whose special ids are set per test."""

    def __init__(self, added: tuple[int, ...] = (), **ids: int) -> None:
        self.added_tokens_decoder = dict.fromkeys(added, "<added>")
        for kind in ("bos", "eos", "pad", "unk"):
            setattr(self, f"{kind}_token_id", ids.get(kind))

    def __len__(self) -> int:
        return 10


def test_special_ids_beyond_the_vocabulary(good_dir: Path) -> None:
    config = load_model(good_dir, tokenizer=False).config
    check_tokenizer(_Tokenizer(bos=1, eos=2, pad=0), config, "m")
    with pytest.raises(TokenizerMismatchError, match=r"m: the tokenizer's eos_token id 531 .*531"):
        check_tokenizer(_Tokenizer(bos=1, eos=531), config, "m")


def test_added_ids_beyond_len_count(good_dir: Path) -> None:
    """An added token's id past len(tokenizer) (ids with gaps) still counts."""
    config = load_model(good_dir, tokenizer=False).config
    check_tokenizer(_Tokenizer(added=(530,)), config, "m")
    with pytest.raises(TokenizerMismatchError, match=r"has 532 tokens .* only 531 rows"):
        check_tokenizer(_Tokenizer(added=(3, 531)), config, "m")


def test_max_length_beyond_positions(good_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MaxLengthError) as err:
        load_model(good_dir, max_length=POSITIONS + 1)
    msg = str(err.value)
    assert str(good_dir) in msg and "max_length=65 is more than the 64 positions" in msg
    assert "n_positions=64" in msg and "--config.max_length=64" in msg
    # Checked before any weight is read: a directory without weights gets the same error.
    shutil.copy(good_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(MaxLengthError):
        load_model(tmp_path, max_length=POSITIONS + 1)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path, max_length=POSITIONS)


@pytest.fixture(scope="module")
def gguf_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    case = CASES["llama_gqa"]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(case.hf_config(), dtype=torch.float32)
    return case, hf


def test_gguf_nan_weight_and_context_length(gguf_case: tuple[Any, Any], tmp_path: Path) -> None:
    case, hf = gguf_case
    tensors = gguf_tensors(case, hf)

    def write(path: Path) -> Path:
        return write_gguf(path, case.arch, tensors, lambda w: write_metadata(w, case, hf.config))

    good = write(tmp_path / "good.gguf")
    assert load_model(good, tokenizer=False, max_length=64).config.max_position_embeddings == 64
    with pytest.raises(MaxLengthError, match=r"llama\.context_length \(GGUF\)=64"):
        load_model(good, tokenizer=False, max_length=65)
    tensors["blk.1.ffn_up.weight"][2, :3] = np.nan
    bad = write(tmp_path / "bad.gguf")
    with pytest.raises(BadWeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight \(3 NaN"):
        load_model(bad, tokenizer=False)


BAD_RUNS = {
    "nan": ("nan_dir", {}, BadWeightsError, NAN_PARAM),
    "tokenizer": ("big_tokenizer_dir", {}, TokenizerMismatchError, "533 tokens"),
    "max_length": ("good_dir", {"max_length": 100}, MaxLengthError, "--config.max_length=64"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_score_run_stops_before_any_shard(
    case: str, request: pytest.FixtureRequest, data_path: Path, tmp_path: Path
) -> None:
    fixture, over, error, text = BAD_RUNS[case]
    model_dir = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    config = load_config(
        ROOT / "configs/ifd_gpt2_alpaca.py",
        {
            "model.path": str(model_dir),
            "data.path": str(data_path),
            "output_dir": str(out),
            "max_length": 48,
            "min_bucket": 16,
            "token_budget": 256,
            "shard_size": 4,
            "progress": False,
            "compilation_cache_dir": "",
            "host.encoded_cache_dir": "",
            **over,
        },
    )
    with pytest.raises(error, match=text):
        score.run(config)
    assert not list((out / "shards").glob("*")) and not (out / "scores.parquet").exists()
    assert not (out / "run.json").exists()
