"""Padding-free steps (``data.pack_batches``): each step's own rows packed into fewer rows.

The same examples, targets and loss per step as unpacked training, only laid out in fewer
rows: the layout (``sft_data.step_rows``), the loss and gradient of one packed batch against
the unpacked one, and whole training runs with and without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.training import random_examples, sft_config, tiny_hf
from test_train import ours_from, tiny_dir  # noqa: F401 (tiny_dir: a fixture)
from torch_train_reference import GRAD_ERR

from resofilter_jax.data import IGNORE_INDEX
from resofilter_jax.training import pipeline as train_main
from resofilter_jax.training.sft_data import (
    BatchPlan,
    collate_step,
    merge_rows,
    pick_rows,
    single_rows,
    step_rows,
)
from resofilter_jax.training.trainer import loss_sums, split_model


def test_steps_keep_their_examples_in_fewer_rows() -> None:
    """Every micro-batch keeps exactly its examples and target count, in the same number of
    rows (a multiple of ``row_multiple``) for all micro-batches; positions restart and
    segments are renumbered; a short last batch and a step that saves no row work."""
    rows = single_rows(random_examples(45, seed=1, lo=6, hi=40))
    plan = BatchPlan(len(rows), 16, 1, seed=2)  # 3 steps, the last one 13 rows
    kw = {"accum": 2, "max_length": 64, "min_bucket": 16}
    packed_steps = 0
    for step in range(plan.total_steps):
        flat = step_rows(rows, plan, step, **kw)
        packed = step_rows(rows, plan, step, pack=True, row_multiple=2, **kw)
        assert packed.length == flat.length and flat.per_micro == 8
        assert packed.per_micro % 2 == 0 and packed.per_micro <= 8
        packed_steps += packed.per_micro < 8
        for m in range(2):
            mine = flat.rows[m * 8 : (m + 1) * 8]
            got = packed.rows[m * packed.per_micro : (m + 1) * packed.per_micro]
            want_examples = sorted(e for r in mine if r is not None for e in r.examples)
            assert sorted(e for r in got if r is not None for e in r.examples) == want_examples
            assert all(len(r) <= packed.length for r in got if r is not None)
        a = collate_step(flat, accum=2, pad_id=0)
        b = collate_step(packed, accum=2, pad_id=0)
        assert b["input_ids"].shape == (2, packed.per_micro, packed.length)
        targets = [np.sum(x["labels"][..., 1:] != IGNORE_INDEX, axis=(1, 2)) for x in (a, b)]
        np.testing.assert_array_equal(targets[0], targets[1])  # per micro-batch
        np.testing.assert_array_equal(
            np.sum(a["segment_ids"] > 0, axis=(1, 2)), np.sum(b["segment_ids"] > 0, axis=(1, 2))
        )
    assert packed_steps == plan.total_steps
    # a step whose rows fill their length stays unpacked: nothing to save
    long_rows = single_rows(random_examples(4, seed=3, lo=60, hi=64))
    same = pick_rows(long_rows, np.arange(4), accum=1, length=64, pack=True)
    assert same.per_micro == 4 and [r.examples for r in same.rows] == [(0,), (1,), (2,), (3,)]


def test_merged_row_segments_positions_and_labels() -> None:
    rows = single_rows(random_examples(3, seed=5, lo=6, hi=9))
    merged = merge_rows([rows[2], rows[0], rows[1]])
    n = [len(rows[i]) for i in (2, 0, 1)]
    want_segments = np.repeat([1, 2, 3], n)
    np.testing.assert_array_equal(merged.segments, want_segments)
    np.testing.assert_array_equal(merged.positions, np.concatenate([np.arange(k) for k in n]))
    starts = np.cumsum([0, *n[:-1]])
    assert np.all(merged.labels[starts] == IGNORE_INDEX) and merged.examples == (2, 0, 1)
    # merging merged rows renumbers their segments after the earlier ones
    twice = merge_rows([merged, rows[0]])
    assert twice.segments.max() == 4 and np.all(twice.segments[-len(rows[0]) :] == 4)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_packed_step_loss_and_gradient_equal_unpacked(name: str) -> None:
    """One step's batch, unpacked (8 right-padded rows) and packed: the same loss sum,
    target count and gradient (fp32; summation order only)."""
    model = ours_from(tiny_hf(name, layers=2))
    parts, params = split_model(model)
    rows = single_rows(random_examples(8, seed=6, lo=9, hi=40))
    flat = pick_rows(rows, np.arange(8), accum=1, length=64)
    packed = pick_rows(rows, np.arange(8), accum=1, length=64, pack=True)
    assert packed.per_micro < 8

    def sums(layout: Any) -> Any:
        batch = {k: jnp.asarray(v[0]) for k, v in collate_step(layout, accum=1, pad_id=0).items()}

        def loss(p: Any) -> Any:
            total, count = loss_sums(parts, p, batch, ce_chunk=16)
            return total, count

        return jax.value_and_grad(loss, has_aux=True)(params)

    (l_flat, n_flat), g_flat = jax.jit(lambda: sums(flat))()
    (l_pack, n_pack), g_pack = jax.jit(lambda: sums(packed))()
    assert float(n_flat) == float(n_pack) > 0
    assert float(l_pack) == pytest.approx(float(l_flat), rel=1e-6)
    for k, g in jax.tree_util.tree_leaves_with_path(g_flat):
        got = dict(jax.tree_util.tree_leaves_with_path(g_pack))[k]
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(g), rtol=0, atol=GRAD_ERR * np.abs(g).max(), err_msg=str(k)
        )


@pytest.fixture(scope="module")
def alpaca_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 alpaca rows, short and long in turn."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    with path.open("w") as f:
        for i in range(40):  # every other row short: short rows fit beside long ones
            a, b = (int(x) for x in rng.integers(0, 50, size=2))
            pad = " more" * int(rng.integers(2, 7))
            text = f"{a}+{b}" if i % 2 else f"Add {a} and {b}{pad}."
            row = {"instruction": text, "input": "", "output": f"{a + b}"}
            f.write(json.dumps(row) + "\n")
    return path


def test_training_with_packed_steps_equals_unpacked(
    tiny_dir: Path,  # noqa: F811 (the fixture imported from test_train)
    alpaca_path: Path,
    tmp_path: Path,
) -> None:
    """The train command with and without ``data.pack_batches`` on a 2-device mesh (packed
    rows a multiple of 2) and 2 micro-batches: the same losses, target tokens and weights."""
    from safetensors.numpy import load_file

    def run(pack: bool) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, Any]]:
        workdir = tmp_path / f"pack_{pack}"
        config = sft_config(
            {
                "model.path": str(tiny_dir),
                "model.dtype": "float32",
                "data.path": str(alpaca_path),
                "data.pack_batches": pack,
                "template": "none",
                "max_length": 64,
                "min_bucket": 16,
                "train.batch_size": 16,
                "train.micro_batch_size": 8,
                "train.epochs": 2,
                "optim.lr": 3e-3,
                "mesh.data": 2,
                "mesh.fsdp": 1,
                "ce_chunk": 16,
                "checkpoint.every": 0,
                "progress": False,
                "compilation_cache_dir": "",
                "workdir": str(workdir),
            }
        )
        summary = train_main.run(config)
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        steps = [m for m in map(json.loads, lines) if "loss" in m]
        return steps, load_file(str(workdir / "hf" / "model.safetensors")), summary

    flat, w_flat, _ = run(False)
    packed, w_pack, summary = run(True)
    assert summary["data"]["pack_batches"] is True
    assert [m["step"] for m in packed] == [m["step"] for m in flat] and len(flat) == 6
    assert [m["target_tokens"] for m in packed] == [m["target_tokens"] for m in flat]
    assert [m["tokens"] for m in packed] == [m["tokens"] for m in flat]
    assert all(m["padded_tokens"] == 16 * 64 for m in flat)  # 16 rows of 64 every step
    assert all(m["tokens"] <= m["padded_tokens"] <= 16 * 64 for m in packed)
    computed = sum(m["padded_tokens"] for m in packed)
    assert computed <= 0.75 * 6 * 16 * 64, [m["padded_tokens"] for m in packed]
    assert [m["loss"] for m in packed] == pytest.approx([m["loss"] for m in flat], rel=1e-5)
    for k, w in w_flat.items():
        np.testing.assert_allclose(w_pack[k], w, rtol=1e-5, atol=1e-6, err_msg=k)
