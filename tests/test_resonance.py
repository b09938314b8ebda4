"""The resonance engine against ResoFilter's PyTorch loop, plus its own properties.

Parity is checked against the loop run in float64 (a real AdamW step, see
``torch_resonance_reference.py``): in float32 the loop's ``theta_before - theta_after`` carries
~ulp(theta) of cancellation error per element, which the closed form avoids.

Tolerances. Float features: 1e-4 relative. Two features depend on single elements whose
gradient is small: near ``|g| ~ eps`` the update ``lr |g| / (|g| + eps)`` is steep in g, and
the gradients of both sides carry fp32 rounding (ours, and transformers' fp32 RMSNorm and
loss even in a float64 model) of ~1e-6 of the typical |g| (up to ~3e-5 for single elements,
``GRAD_ERR_MAX``, depending on the CPU). ``std_abs`` (the spread of
``|delta|`` is only ~1e-3 of its mean, and a few small-gradient elements carry much of it)
gets, on top, the first-order effect of a gradient error of ``GRAD_ERR * median|g|`` per
element; a count may differ by at most the number of elements whose float64 ``|delta|`` lies
within ``1e-6 * bound`` plus the effect of a ``GRAD_ERR_MAX`` gradient error at the bound, or
whose gradient is smaller than that error (its sign is uncertain). The allowances are computed
from the float64 reference and checked to be small where no gradient is within 100 eps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from scipy.stats import spearmanr
from support.models import loaded, reference
from support.scoring import (
    LR,
    WD,
    assert_matches_loop,
    near_bound,
    packed_batch,
    per_example,
    sensitivity,
    std_abs_allowance,
    tiny_batch,
    tiny_run,
    unpadded,
)
from torch_resonance_reference import resonance_loop

from resofilter_jax.data import (
    BatchPlan,
    collate,
    encode_sft_examples,
    load_records,
    pack_sequences,
    segment_slots,
)
from resofilter_jax.data.encoding import IGNORE_INDEX
from resofilter_jax.data.records import Record
from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.registry import build_model
from resofilter_jax.scoring.param_select import select_params, sort_names
from resofilter_jax.scoring.projection import ProjectionSpec, matrix_rows
from resofilter_jax.scoring.record_stream import duplicate_of
from resofilter_jax.scoring.reso_features import order_stats
from resofilter_jax.scoring.resonance import (
    ResonanceSpec,
    example_bytes,
    feature_names,
    make_resonance_fn,
    matrix_feature_names,
    microbatch_size,
    to_columns,
    update_delta,
)


@pytest.mark.parametrize("name", ["llama", "gpt2", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_every_feature_matches_float64_torch_adamw_loop(name: str) -> None:
    spec, out, ref = tiny_run(name)
    assert_matches_loop(spec, out, ref)


@pytest.mark.parametrize("method", ["histogram", "bisect"])
def test_order_statistics_are_exact_when_the_sample_bracket_misses_too(method: str) -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    smooth = np.abs(rng.normal(size=n)).astype(np.float32)
    repeats = np.round(smooth * 8) / 8  # long runs of equal values
    # Every 4th element (the strided sample when n = 4 * 4096 + ...) is tiny: the sample's
    # bracket is wrong for every rank and the search must fall back to the whole range.
    trap = np.full(n, 3.0, np.float32)
    trap[::4] = rng.uniform(0, 1e-3, size=trap[::4].size)
    ranks = [0, 1, 2000, 4999, 5000, 10_000, 19_998, n - 1]
    # values spanning every exponent (both histogram passes, coarse bins far apart), inf, NaN
    wide = np.abs(rng.normal(size=n)).astype(np.float32) * np.float32(2.0) ** rng.integers(
        -140, 120, size=n
    ).astype(np.float32)
    wide[:3] = [0.0, np.inf, np.nan]
    rows = np.stack([smooth, repeats, trap, np.zeros(n, np.float32), wide])  # [5, n]
    got = jax.jit(jax.vmap(lambda a: order_stats(a, ranks, method)))(rows)
    np.testing.assert_array_equal(got, np.sort(rows, axis=1)[:, ranks])
    small = smooth[:37]  # fewer elements than the sample: the bracket is exact
    got = order_stats(jnp.asarray(small), [0, 18, 36], method)
    np.testing.assert_array_equal(got, np.sort(small)[[0, 18, 36]])
    assert order_stats(jnp.asarray(small), [], method).shape == (0,)


def test_all_params_in_the_optimizer_changes_nothing_for_the_chosen() -> None:
    spec, _, ref = tiny_run("llama")
    batch = tiny_batch("llama")
    full = resonance_loop(reference("llama").hf, unpadded(batch)[:1], spec.params, all_params=True)
    for p in spec.params:
        for f, v in full[0]["features"][p].items():
            assert v == pytest.approx(ref[0]["features"][p][f], rel=1e-12, abs=1e-300), (p, f)


def test_float32_torch_loop_suffers_cancellation_and_closed_form_does_not() -> None:
    spec, out, ref64 = tiny_run("llama")
    ref32 = resonance_loop(
        reference("llama").hf,
        unpadded(tiny_batch("llama")),
        spec.params,
        dtype=torch.float32,
        keep=True,
    )
    p = spec.params[0]  # model.layers.0.mlp.up_proj.weight

    def rel(a: np.ndarray, feature: str) -> np.ndarray:
        b = np.array([r["features"][p][feature] for r in ref64])
        return np.abs(np.asarray(a, np.float64) - b) / np.abs(b)

    # Per element, before - after in fp32 is off by ~ulp(theta) / lr ~ 1e-3 relative.
    per_elem = max(
        np.abs(r32["delta"][p] - r64["delta"][p]).max()
        for r32, r64 in zip(ref32, ref64, strict=True)
    )
    assert per_elem / LR > 1e-4
    ours = rel(out["mean_abs"][:, 0], "mean_abs")
    theirs = rel([r["features"][p]["mean_abs"] for r in ref32], "mean_abs")
    assert ours.max() <= 1e-6
    assert 1e-5 < theirs.max() < 1e-3  # averaging over elements hides most of it ...
    spread = np.ptp(out["mean_abs"][:, 0]) / out["mean_abs"][:, 0].mean()
    assert spread < theirs.max()  # ... but not enough to rank these samples
    assert rel([r["features"][p]["std_abs"] for r in ref32], "std_abs").max() > 0.01
    assert rel(out["std_abs"][:, 0], "std_abs").max() < 1e-3


@pytest.mark.parametrize("rule", ["adamw", "adam", "sgd"])
def test_closed_form_equals_one_torch_optimizer_step(rule: str) -> None:
    rng = np.random.default_rng(0)
    theta = (0.1 * rng.standard_normal(4096)).astype(np.float32)
    # Gradients from 1e-10 to 1e-1, including |g| ~ eps, both signs, and exact zeros.
    grad = np.sign(rng.standard_normal(4096)) * 10.0 ** rng.uniform(-10, -1, 4096)
    grad[:8] = 0.0
    t = torch.from_numpy(theta.astype(np.float64)).requires_grad_(True)
    t.grad = torch.from_numpy(grad)
    opt = {
        "adamw": lambda: torch.optim.AdamW([t], lr=LR, weight_decay=WD),
        "adam": lambda: torch.optim.Adam([t], lr=LR, weight_decay=WD),
        "sgd": lambda: torch.optim.SGD([t], lr=LR, weight_decay=WD),
    }[rule]()
    opt.step()
    want = t.detach().numpy() - theta.astype(np.float64)  # [n] float64 update
    spec = ResonanceSpec(params=("w",), rule=rule, weight_decay=WD)
    got = np.asarray(update_delta(jnp.asarray(theta), jnp.asarray(grad, jnp.float32), spec))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.slow  # invariance sweep
def test_microbatch_sizes_and_data_shards_give_the_same_features() -> None:
    model, _ = loaded("llama")
    names = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight")
    batch = tiny_batch("llama", dummy_rows=3)  # [6, 24]: 3 samples, 3 all-padding rows
    runs = {}
    # micro 1: 6 steps; micro 2 over 2 data shards: 3 rows a shard, 2 steps, 1 padded; B: 1.
    for micro, shards in ((1, 1), (2, 2), (None, 1)):
        spec = ResonanceSpec(params=names, micro=micro)
        fn = make_resonance_fn(model, spec, data_shards=shards)
        runs[(micro, shards)] = jax.device_get(fn(batch))
    base = runs[(None, 1)]
    assert np.isnan(base["score"][3:]).all() and (base["n_abs_le_1e-05"][3:] == -1).all()
    assert (base["n_tokens"][3:] == 0).all() and np.isfinite(base["score"][:3]).all()
    # Other batch shapes round the fp32 gradients differently: std_abs and the counts get
    # the allowances of the float64 parity test (same samples and matrices).
    _, _, ref = tiny_run("llama")
    for key, out in runs.items():
        for f, v in out.items():
            if f == "std_abs" or f.startswith("n_") and f != "n_tokens":
                for i, r in enumerate(ref):
                    for j, p in enumerate(names):
                        sens = sensitivity(r["grad"][p])
                        if f == "std_abs":
                            tol = 1e-5 * v[i, j] + 2 * std_abs_allowance(r["delta"][p], sens)
                        else:
                            tol = 2 * near_bound(
                                r["delta"][p], r["grad"][p], float(f.rsplit("_", 1)[1])
                            )
                        assert abs(v[i, j] - base[f][i, j]) <= tol, (key, f, i, j)
                np.testing.assert_array_equal(np.isnan(v), np.isnan(base[f]))
            elif np.issubdtype(v.dtype, np.floating):
                np.testing.assert_allclose(v, base[f], rtol=1e-6, err_msg=f"{key} {f}")
            else:
                np.testing.assert_array_equal(v, base[f], err_msg=f"{key} {f}")
    spec = ResonanceSpec(params=names)
    cols = to_columns(base, spec)
    assert list(cols) == feature_names(spec)
    assert len(cols) == 4 + 2 * len(matrix_feature_names(spec))
    assert cols["reso/model.layers.1.mlp.up_proj.weight/l2"][1] == base["l2"][1, 1]


@pytest.mark.slow  # float64 reference sweep
def test_projection_is_the_projected_float64_torch_gradient() -> None:
    """Projected gradients of up_proj (2 layers), o_proj and a norm vector, concatenated."""
    spec, _, ref = tiny_run("llama")
    model, _ = loaded("llama")
    proj = ProjectionSpec(dim=24, seed=5, block=100)  # partial last blocks; the norm: 1 of 64
    batch = tiny_batch("llama", dummy_rows=2)  # [5, 24]
    runs = {}
    for micro, shards in ((None, 1), (2, 5)):  # 1 step of 5 / 5 shards x 1 row in 2 steps
        s = ResonanceSpec(params=spec.params, projection=proj, quantiles=(), bounds=(), micro=micro)
        runs[(micro, shards)] = jax.device_get(
            make_resonance_fn(model, s, data_shards=shards)(batch)
        )
    out = runs[(None, 1)]
    assert out["projection"].shape == (5, 24) and out["projection"].dtype == np.float32
    assert np.isnan(out["projection"][3:]).all() and np.isfinite(out["projection"][:3]).all()
    # The documented order: spec.params in order, each flattened row-major (torch layout).
    flat = np.stack([np.concatenate([r["grad"][p].ravel() for p in spec.params]) for r in ref])
    d = flat.shape[1]
    assert d == sum(int(np.prod(r.shape)) for r in ref[0]["grad"].values())
    s_mat = np.asarray(matrix_rows(jax.random.key(5), 0, d, proj), np.float64)  # [D, K]
    want = flat @ s_mat / np.sqrt(24)  # [3, K] from float64 gradients

    def rel_err(p: np.ndarray, q: np.ndarray) -> float:
        """Largest per-example |p - q| / |q| (entries can cancel: compare whole vectors)."""
        return float((np.linalg.norm(p - q, axis=1) / np.linalg.norm(q, axis=1)).max())

    # fp32 gradients carry ~GRAD_ERR of the typical |g| per element.
    assert rel_err(out["projection"][:3], want) < 1e-5
    for key, o in runs.items():  # microbatches and data shards: the same projections
        np.testing.assert_array_equal(np.isnan(o["projection"]), np.isnan(out["projection"]))
        assert rel_err(o["projection"][:3], out["projection"][:3]) < 1e-5, key


def test_micro_follows_the_memory_budget_and_too_small_a_budget_is_an_error() -> None:
    model, _ = loaded("llama")
    spec = ResonanceSpec(params=("model.layers.1.mlp.up_proj.weight",))
    need = example_bytes(model, spec, 24)
    assert 4 * 64 * 128 * 6 < need < 2**24
    for k in (1, 3):
        budget = ResonanceSpec(params=spec.params, memory_budget_bytes=k * need + 1)
        assert microbatch_size(model, budget, 24, rows=8) == k
    assert microbatch_size(model, ResonanceSpec(params=spec.params, micro=5), 24, rows=3) == 3
    tight = ResonanceSpec(params=spec.params, memory_budget_bytes=need - 1)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        make_resonance_fn(model, tight)(tiny_batch("llama"))


def _count_dots(jaxpr: Any) -> int:
    """dot_general equations in a closed jaxpr, sub-jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                if hasattr(sub, "eqns"):
                    n += _count_dots(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    n += _count_dots(sub.jaxpr)
    return n


def four_layer_llama() -> Any:
    """A random 4-layer Llama (vocab 128, hidden 64) for counting backward work."""
    hf = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return build_model(config_from_hf(hf.to_dict()), seed=0)


@pytest.mark.parametrize("slots", [None, 4], ids=["unpacked", "packed"])
def test_backward_work_stops_at_the_lowest_chosen_layer(slots: int | None) -> None:
    model = four_layer_llama()
    batch = tiny_batch("llama")
    if slots is not None:  # the three samples in one row
        batch, _ = packed_batch(batch, [[0, 1, 2]], 64)
    flops, dots = {}, {}
    for layer in (0, 3):
        spec = ResonanceSpec(params=(f"model.layers.{layer}.mlp.up_proj.weight",))
        fn = make_resonance_fn(model, spec)
        flops[layer] = fn.lower(batch, slots=slots).cost_analysis()["flops"]
        args = (fn._theta, fn._rest, fn._inputs(batch, slots))
        jaxpr = jax.make_jaxpr(lambda t, r, b, fn=fn: fn._batch(t, r, b, slots=slots))(*args)
        dots[layer] = _count_dots(jaxpr.jaxpr)
    # Forward: 4 x 9 dots + LM head. The backward from layer 3 crosses 1 layer, from 0 all 4.
    per_layer = (dots[0] - dots[3]) / 3  # backward dots of one decoder layer
    assert per_layer >= 9
    forward = 4 * 9 + 1
    assert dots[3] <= forward + per_layer + 4  # + the LM head's backward
    assert flops[3] < 0.75 * flops[0], flops


def test_duplicate_queries_point_at_the_first_occurrence() -> None:
    recs = [
        Record(0, "What is 2+2?"),
        Record(1, "Translate", input="hello"),
        Record(2, "What is 2+2?", output="4"),
        Record(3, "Translate\nhello"),  # same query text as record 1
        Record(4, "What is 2+2?", status="error:bad_json"),
        Record(5, "what is 2+2?"),
        Record(6, "Translate", input="hello"),
    ]
    assert duplicate_of(recs).tolist() == [-1, -1, 0, 1, -1, -1, 1]


def test_parameter_selection_by_regex_and_last_k_layers() -> None:
    model, _ = loaded("llama")
    assert select_params(model, param_type="mlp.up_proj.weight", last_k=1) == [
        "model.layers.1.mlp.up_proj.weight"
    ]
    assert select_params(model, r"layers\.\d+\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    smol = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(30)] + ["model.norm.weight"]
    got = select_params(smol[::-1], param_type="mlp.up_proj.weight", last_k=3)
    assert got == [f"model.layers.{i}.mlp.up_proj.weight" for i in (27, 28, 29)]
    gpt2, _ = loaded("gpt2")
    assert select_params(gpt2, param_type="mlp.c_fc.weight", last_k=2) == [
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_fc.weight",
    ]
    assert sort_names(
        ["lm_head.weight", "model.layers.10.x", "model.layers.9.x", "model.embed_tokens.weight"]
    ) == [
        "model.embed_tokens.weight",
        "model.layers.9.x",
        "model.layers.10.x",
        "lm_head.weight",
    ]


def test_parameter_selection_errors_name_what_exists() -> None:
    model, _ = loaded("llama")
    with pytest.raises(ValueError, match=r"matches none.*model\.layers\.0\.mlp\.up_proj\.weight"):
        select_params(model, r"mlp\.c_fc")
    with pytest.raises(
        ValueError, match=r"unknown parameter type 'mlp\.c_fc\.weight'.*mlp\.up_proj\.weight"
    ):
        select_params(model, param_type="mlp.c_fc.weight")
    with pytest.raises(ValueError, match=r"last_k must be in 1\.\.2"):
        select_params(model, param_type="mlp.up_proj.weight", last_k=3)
    with pytest.raises(ValueError, match="exactly one"):
        select_params(model)
    with pytest.raises(ValueError, match="bad parameter pattern"):
        select_params(model, "(")
    with pytest.raises(ValueError, match="no parameter"):
        make_resonance_fn(model, ResonanceSpec(params=("model.layers.7.mlp.up_proj.weight",)))
    for bad in (
        dict(rule="lion"),
        dict(aggregate="median"),
        dict(quantiles=(1.0,)),
        dict(params=()),
    ):
        with pytest.raises(ValueError):
            ResonanceSpec(**{"params": ("w",), **bad})


# ---- real weights: SmolLM2-135M-Instruct on GSM8K ---------------------------------------------

N_SMOL = 16
SMOL_LEN = 80


@pytest.fixture(scope="module")
def smol_setup(smollm2, gsm8k_path) -> tuple[list[str], dict[str, np.ndarray], list, dict]:
    """16 GSM8K pairs, last 3 layers' up_proj, and our fp32 results.

    ChatML, right-truncated to 80 tokens (CPU time); the first pairs whose question leaves
    at least 24 answer tokens.
    """
    records, _ = load_records(gsm8k_path, "gsm8k")
    encoded = encode_sft_examples(
        records[:64], smollm2.tokenizer, max_length=SMOL_LEN, template="chatml"
    )
    examples = [e for e in encoded if np.sum(e.labels != IGNORE_INDEX) >= 24][:N_SMOL]
    assert len(examples) == N_SMOL and all(e.status == "ok" for e in examples)
    names = select_params(smollm2.model, param_type="mlp.up_proj.weight", last_k=3)
    plan = BatchPlan(SMOL_LEN, np.arange(N_SMOL))
    batch = collate(plan, [e.ids for e in examples], [e.labels for e in examples], 0)
    spec = ResonanceSpec(params=tuple(names))
    out = jax.device_get(make_resonance_fn(smollm2.model, spec)(batch))
    return names, batch, examples, out


@pytest.fixture(scope="module")
def smol_torch(smol_setup, smollm2_torch) -> tuple[list[dict], np.ndarray]:
    """The float64-step torch loop on the 16 examples: per-example results and scores."""
    names, _, examples, _ = smol_setup
    pairs = [(e.ids, e.labels) for e in examples]
    # fp32 model (as the fixture), float64 AdamW step: the torch step without cancellation.
    ref = resonance_loop(smollm2_torch, pairs, names, dtype=torch.float32, step_dtype=torch.float64)
    return ref, np.array([np.mean([r["features"][p]["mean_abs"] for p in names]) for r in ref])


def test_smollm2_scores_rank_like_the_float64_torch_loop(smol_setup, smol_torch) -> None:
    names, _, _, out = smol_setup
    assert names == [f"model.layers.{i}.mlp.up_proj.weight" for i in (27, 28, 29)]
    ref, want = smol_torch
    np.testing.assert_allclose(out["loss"], [r["loss"] for r in ref], rtol=1e-4)
    np.testing.assert_allclose(out["score"], want, rtol=1e-5)
    assert np.ptp(want) / want.mean() > 1e-4  # the samples really differ
    assert spearmanr(out["score"], want).statistic >= 0.99


N_RANK = 64  # rows of the bf16-vs-fp32 ranking check: 16 rows made a 0.99 threshold fragile


def test_smollm2_bfloat16_mode_ranks_like_float32(smollm2, gsm8k_path) -> None:
    """Fast mode (bf16 compute, fp32 accumulation) ranks 64 real GSM8K rows like fp32.

    Packed rows, as the runner scores them by default. Scores differ between samples only in
    their 3rd-4th significant digit, so this checks the precision contract end to end.
    """
    records, _ = load_records(gsm8k_path, "gsm8k")
    encoded = encode_sft_examples(
        records[:160], smollm2.tokenizer, max_length=SMOL_LEN, template="chatml"
    )
    examples = [e for e in encoded if np.sum(e.labels != IGNORE_INDEX) >= 24][:N_RANK]
    assert len(examples) == N_RANK
    names = select_params(smollm2.model, param_type="mlp.up_proj.weight", last_k=3)
    batch = collate(
        BatchPlan(SMOL_LEN, np.arange(N_RANK)),
        [e.ids for e in examples],
        [e.labels for e in examples],
        0,
    )
    rows = pack_sequences(batch["attention_mask"].sum(1), [160], max_per_row=4)
    arrays, where = packed_batch(batch, rows, 160)
    slots = 1 << (segment_slots(arrays) - 1).bit_length()
    scores = {}
    for dtype in ("float32", "bfloat16"):
        # Only the score is compared: no quantiles / counts (CPU time).
        spec = ResonanceSpec(params=tuple(names), compute_dtype=dtype, quantiles=(), bounds=())
        out = jax.device_get(make_resonance_fn(smollm2.model, spec)(arrays, slots=slots))
        scores[dtype] = per_example(out, where)
    fast, ref = scores["bfloat16"], scores["float32"]
    assert fast["score"].dtype == np.float32 and np.isfinite(fast["score"]).all()
    np.testing.assert_allclose(fast["loss"], ref["loss"], rtol=0.05)
    rho = spearmanr(fast["score"], ref["score"]).statistic
    print(f"bf16-vs-fp32 Spearman over {N_RANK} rows: {rho:.4f}")
    assert rho >= 0.99


@pytest.fixture(scope="module")
def smol_packed(smol_setup, smollm2) -> dict[str, np.ndarray]:
    """The 16 examples of `smol_setup` packed best-fit into rows of 160 tokens (<= 4 each)."""
    names, batch, _, _ = smol_setup
    lens = batch["attention_mask"].sum(1)
    rows = pack_sequences(lens, [160], max_per_row=4)
    assert len(rows) < N_SMOL and max(len(r) for r in rows) >= 2
    arrays, where = packed_batch(batch, rows, 160)
    spec = ResonanceSpec(params=tuple(names))
    slots = 1 << (segment_slots(arrays) - 1).bit_length()
    out = jax.device_get(make_resonance_fn(smollm2.model, spec)(arrays, slots=slots))
    return per_example(out, where)


def test_smollm2_packed_rows_score_like_unpacked_and_the_torch_loop(
    smol_setup, smol_packed, smol_torch
) -> None:
    _, _, _, out = smol_setup
    np.testing.assert_allclose(smol_packed["loss"], out["loss"], rtol=1e-5)
    np.testing.assert_array_equal(smol_packed["n_tokens"], out["n_tokens"])
    np.testing.assert_allclose(smol_packed["score"], out["score"], rtol=1e-5)
    _, want = smol_torch
    np.testing.assert_allclose(smol_packed["score"], want, rtol=1e-5)
    assert spearmanr(smol_packed["score"], want).statistic >= 0.99
