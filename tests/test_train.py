"""Fine-tuning: parity with a PyTorch AdamW loop, accumulation, packing, data parallelism,
checkpoint resume (after SIGKILL and after a clean stop), export round trip, learning on GSM8K.

Models are tiny random Hugging Face configs (the style of ``test_model_parity.py``) with a
character-level tokenizer. SmolLM2 is not trained here: 30 steps of the 135M model on 32 GSM8K
rows is ~10 TFLOP of forward/backward plus a ~1 min compile, minutes on this 2-core machine
(the real command was run by hand). Train-step programs are shared between tests through a
persistent compilation cache: compiling one costs ~6 s of CPU here, more than running it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from support.training import char_tokenizer, random_examples, sft_config, tiny_hf
from torch_train_reference import (
    GRAD_ERR,
    StepRecord,
    assert_params_close,
    warmup_cosine,
)
from torch_train_reference import train as torch_train

from resofilter_jax.data import SFTExample
from resofilter_jax.models.base import REMAT_POLICIES, check_remat
from resofilter_jax.models.config import config_from_hf
from resofilter_jax.models.loading import load_model
from resofilter_jax.models.registry import build_model, load_state_dict, named_params
from resofilter_jax.parallel import make_train_mesh
from resofilter_jax.training import pipeline as train_main
from resofilter_jax.training.optim import make_optimizer, make_schedule
from resofilter_jax.training.sft_data import BatchPlan, collate_rows, packed_rows, single_rows
from resofilter_jax.training.trainer import Trainer, loss_sums, split_model

REPO = Path(__file__).resolve().parents[1]
LR, WD, BETAS, EPS, CLIP = 1e-2, 0.1, (0.9, 0.95), 1e-8, 1.0


# --- helpers: our model from HF weights, batches, recorded steps -----------------------------


def ours_from(hf: transformers.PreTrainedModel) -> Any:
    """Our fp32 model with the HF model's weights."""
    config = config_from_hf(hf.config.to_dict())
    model = build_model(config, seed=None)
    ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    load_state_dict(model, state, ignore=ignore, strict=True)
    return model


def step_batches(examples: list[SFTExample], rows: int, accum: int) -> list[dict[str, np.ndarray]]:
    """Consecutive optimizer-step batches [accum, rows // accum, 32] of unpacked examples."""
    rs = single_rows(examples)
    return [
        collate_rows(rs, np.arange(s, s + rows), accum=accum, length=32, pad_id=0)
        for s in range(0, len(rs) - rows + 1, rows)
    ]


def to_torch_micro(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Our [accum, rows, seq] batch as the torch loop's micro-batches."""
    return [
        {
            "input_ids": batch["input_ids"][a],
            "attention_mask": (batch["segment_ids"][a] > 0).astype(np.int64),
            "labels": batch["labels"][a],
        }
        for a in range(batch["input_ids"].shape[0])
    ]


def one_device_mesh() -> Any:
    return make_train_mesh(1, 1, jax.devices()[:1])


def host(params: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in params.items()}


def adam_state(opt_state: Any) -> Any:
    return next(
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(x, optax.ScaleByAdamState)
    )


class Run(NamedTuple):
    """Per optimizer step: loss, error-bound record, clipped gradients, the state it started
    from (host copy of ``Trainer.state()``) and the parameters after it."""

    losses: list[float]
    records: list[StepRecord]
    grads: list[dict[str, np.ndarray]]
    starts: list[dict[str, Any]]
    params: list[dict[str, np.ndarray]]


def recorded_steps(
    trainer: Trainer,
    batches: list[dict[str, np.ndarray]],
    sched: Any,
    b1: float,
    b2: float,
    starts: list[dict[str, Any]] | None = None,
) -> Run:
    """Trains on ``batches``, reading each step's gradient back from Adam's first moment.

    With ``starts``, step ``s`` begins from ``starts[s]`` (another run's state before its step
    ``s``) instead of where the step before ended: each step is then compared with a step
    from the same state, so only that step's rounding differs (see ``assert_same_training``).
    """
    run = Run([], [], [], [], [])
    for step, batch in enumerate(batches):
        if starts is not None:
            trainer.load_state(starts[step])
        run.starts.append(jax.device_get(trainer.state()))
        mu = adam_state(run.starts[-1]["opt_state"]).mu
        run.losses.append(float(trainer.step(batch)["loss"]))
        state = jax.device_get(adam_state(trainer.opt_state))
        new_mu, nu = state.mu, state.nu
        grads = {k: (new_mu[k] - b1 * mu[k]) / (1 - b1) for k in mu}
        corr = 1 - b2 ** int(state.count)
        run.records.append(
            StepRecord(
                float(sched(step)),
                {k: float(np.abs(g).max()) for k, g in grads.items()},
                {k: np.sqrt(nu[k] / corr) + EPS for k in nu},
            )
        )
        run.grads.append(grads)
        run.params.append(host(trainer.params))
    return run


def state_from_torch(trainer: Trainer, step: dict[str, Any], count: int) -> dict[str, Any]:
    """``trainer``'s state set to the torch loop's after one of its steps (``count`` steps
    taken): its parameters, AdamW moments and step count (Adam's and the schedule's)."""
    names = list(trainer.params)

    def fill(x: Any) -> Any:
        if isinstance(x, optax.ScaleByAdamState):
            mu, nu = ({k: step[m][k] for k in names} for m in ("exp_avg", "exp_avg_sq"))
            return x._replace(count=np.int32(count), mu=mu, nu=nu)
        if isinstance(x, optax.ScaleByScheduleState):
            return x._replace(count=np.int32(count))
        return x

    kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    opt_state = jax.tree.map(
        fill, jax.device_get(trainer.opt_state), is_leaf=lambda x: isinstance(x, kinds)
    )
    return {"params": {k: step["params"][k] for k in names}, "opt_state": opt_state}


def assert_moments_close(
    got: Any, want: dict[str, Any], grad_max: dict[str, float], b1: float, b2: float
) -> None:
    """Adam's moments after one step from the same state, to the bound of GRAD_ERR gradient
    rounding: |d mu| <= (1 - b1) |d g|; |d sqrt(nu)| <= sqrt(1 - b2) |d g| (sqrt(nu) is the
    norm of (sqrt(b2 nu_prev), sqrt(1 - b2) g)); plus fp32 rounding of the moments."""
    state = adam_state(got)
    rounding = 8 * np.finfo(np.float32).eps
    for k, mu in state.mu.items():
        dg = GRAD_ERR * grad_max[k]
        np.testing.assert_allclose(
            mu, want["exp_avg"][k], rtol=rounding, atol=(1 - b1) * dg, err_msg=k
        )
        np.testing.assert_allclose(
            np.sqrt(state.nu[k]),
            np.sqrt(want["exp_avg_sq"][k]),
            rtol=rounding,
            atol=np.sqrt(1 - b2) * dg,
            err_msg=k,
        )


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A persistent compilation cache for this module: the run() calls (and the subprocess)
    of one configuration compile their train step once. Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    old = jax.config.jax_compilation_cache_dir
    path = tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", old)
    cc.reset_cache()


# --- parity with PyTorch --------------------------------------------------------------------


def make_tx(shapes: dict[str, tuple]) -> tuple[optax.GradientTransformation, Any]:
    """The optimizer of the parity, accumulation and data-parallel tests (one compiled step
    program per batch layout, shared through the compilation cache): AdamW, b2 0.95, weight
    decay on matrices, torch-style clipping at CLIP, cosine over 3 steps without warmup."""
    return make_optimizer(
        shapes=shapes,
        lr=LR,
        total_steps=3,
        warmup=0,
        weight_decay=WD,
        b1=BETAS[0],
        b2=BETAS[1],
        eps=EPS,
        clip_norm=CLIP,
    )


def parity_batches(accum: int) -> list[dict[str, np.ndarray]]:
    """3 optimizer steps of 8 rows each (random lengths and prompt masks)."""
    return step_batches(random_examples(24, seed=1), rows=8, accum=accum)


def test_steps_match_torch_adamw() -> None:
    """fp32: each optimizer step equals transformers' model trained with torch AdamW +
    LambdaLR (optax's schedule formula) + clip_grad_norm_ from the same state: loss, grad
    norm, lr, parameters and Adam's moments after it.

    Step 1 starts from the shared initial weights; steps 2 and 3 from the torch loop's state
    after the step before (weights, moments, step count), so every step is held to the bound
    of its own gradient rounding. (Run freely, fp32 rounding of a gradient element near Adam's
    eps moves its update by up to ~4% of lr at step 1, e.g. a layer-0 gate_proj element with
    g = 1.6e-8 +- 1.5e-9; that reaches every step-2 gradient, ~1e-4 of max |g|, and which of
    two fp32 runs lands nearer a float64 run is chance. The free-running losses are checked.)

    lr = peak, 0.75 peak, 0.25 peak (cosine over 3 steps; the warmup branch of the formula is
    checked in ``test_schedule_formula``). Each step has 2 micro-batches with different target
    counts, so a per-micro-batch mean would differ from the token-weighted mean; clipping is
    active (grad norm > CLIP); norm weights are left undecayed on both sides.
    """
    hf = tiny_hf("llama")
    model = ours_from(hf)
    before = host(named_params(model))
    batches = parity_batches(accum=2)
    tx, sched = make_tx({k: v.shape for k, v in before.items()})
    trainer = Trainer(model, tx, one_device_mesh(), ce_chunk=16, schedule=sched)
    free = [float(trainer.step(b)["loss"]) for b in batches]  # free-running, then forced
    trainer.load_state({"params": before, "opt_state": jax.device_get(tx.init(before))})
    ref = torch_train(
        hf,
        [to_torch_micro(b) for b in batches],
        lr=LR,
        weight_decay=WD,
        betas=BETAS,
        eps=EPS,
        warmup=0,
        total=3,
        clip_norm=CLIP,
    )
    assert [r["lr"] for r in ref] == pytest.approx([LR, 0.75 * LR, 0.25 * LR])
    assert free == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    for s, (b, r) in enumerate(zip(batches, ref, strict=True)):
        if s > 0:
            trainer.load_state(state_from_torch(trainer, ref[s - 1], count=s))
        o = jax.device_get(trainer.step(b))
        assert float(o["loss"]) == pytest.approx(r["loss"], rel=1e-5)
        assert float(o["grad_norm"]) == pytest.approx(r["grad_norm"], rel=1e-5)
        assert float(sched(s)) == pytest.approx(r["lr"], rel=1e-6)
        assert float(o["lr"]) == pytest.approx(r["lr"], rel=1e-6)  # the step's own lr
        assert r["grad_norm"] > CLIP  # clipping is exercised
        params = host(trainer.params)
        if s == 0:
            matrices = [k for k in before if before[k].ndim >= 2]
            moved = sum(int(np.sum(params[k] != before[k])) for k in matrices)
            assert moved > 0.9 * sum(before[k].size for k in matrices)
        record = StepRecord(r["lr"], r["grad_max"], r["denom"])
        assert_params_close(params, r["params"], [record], rtol=1e-5)
        assert_moments_close(jax.device_get(trainer.opt_state), r, r["grad_max"], *BETAS)


def test_schedule_formula() -> None:
    """optax's warmup-cosine schedule equals the formula the torch loop implements."""
    for total, warmup in ((10, 0), (10, 3), (7, 1), (5, 5)):
        sched = make_schedule(2.0, total, warmup)
        for s in range(total + 2):
            want = 2.0 * warmup_cosine(s, warmup=warmup, total=total)
            assert float(sched(s)) == pytest.approx(want, rel=1e-6, abs=1e-7), (total, warmup, s)


# --- accumulation, data parallelism, packing ------------------------------------------------


def trained(
    batches: list[dict[str, np.ndarray]], mesh: Any, starts: Run | None = None
) -> tuple[Trainer, Run]:
    """The parity test's model and optimizer trained on ``batches`` over ``mesh``; with
    ``starts``, each step from that run's state before its step (``recorded_steps``)."""
    model = ours_from(tiny_hf("llama"))
    tx, sched = make_tx({k: v.shape for k, v in named_params(model).items()})
    trainer = Trainer(model, tx, mesh, ce_chunk=16)
    forced = None if starts is None else starts.starts
    return trainer, recorded_steps(trainer, batches, sched, BETAS[0], BETAS[1], forced)


@functools.cache
def big_batch_run() -> Run:
    """The reference of the next two tests: the parity batches, 8 rows at once, one device."""
    return trained(parity_batches(accum=1), one_device_mesh())[1]


def assert_same_training(got: Run, want: Run) -> None:
    """Same computation, other fp32 summation order, each step from the same state (``got``
    was run with ``starts=want``): equal losses, gradients (GRAD_ERR) and updates (1e-6
    relative, or the Adam bound of that step's gradient rounding)."""
    assert got.losses == pytest.approx(want.losses, rel=1e-6)
    for s, (got_grads, want_grads) in enumerate(zip(got.grads, want.grads, strict=True)):
        for k, g in want_grads.items():
            np.testing.assert_allclose(
                got_grads[k], g, rtol=0, atol=GRAD_ERR * np.abs(g).max(), err_msg=f"{k} step {s}"
            )
        assert_params_close(got.params[s], want.params[s], want.records[s : s + 1], rtol=1e-6)


def test_accumulation_equals_one_big_batch() -> None:
    """2 micro-batches of 4 rows (different target counts) = 1 batch of 8 rows, 3 steps."""
    want = big_batch_run()
    assert_same_training(trained(parity_batches(accum=2), one_device_mesh(), want)[1], want)


def test_data_parallel_and_fsdp_equal_one_device() -> None:
    """All 8 CPU devices as a 2 (data) x 4 (fsdp) mesh = 1 device: each step's rows split over
    the 8 devices (gradients all-reduced), parameters and Adam moments sharded 4 ways."""
    want = big_batch_run()
    many, run = trained(parity_batches(accum=1), make_train_mesh(2, 4), want)
    up = many.params["model.layers.0.mlp.up_proj.weight"]  # [128, 64], rows over fsdp
    assert up.sharding.shard_shape(up.shape) == (32, 64)
    assert len(many.batch_sharding.mesh.devices.flat) == 8
    mu = adam_state(many.opt_state).mu["model.layers.0.mlp.up_proj.weight"]
    assert mu.sharding.shard_shape(mu.shape) == (32, 64)
    assert_same_training(run, want)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_packed_loss_equals_unpacked(name: str) -> None:
    """Packed rows (positions restart, segment-masked attention) give the unpacked loss sum and
    target count. Gemma 2's sliding window (8) is shorter than the examples; GPT-2 reads the
    positions through its learned position table."""
    model = ours_from(tiny_hf(name, layers=1))
    parts, params = split_model(model)
    examples = random_examples(10, seed=4, lo=9, hi=40)
    packed = packed_rows(examples, max_length=64)
    assert len(packed) < len(examples) and max(len(r.examples) for r in packed) >= 3
    assert sorted(i for r in packed for i in r.examples) == list(range(len(examples)))

    def sums(rows: list, length: int) -> tuple[jax.Array, jax.Array]:
        batch = collate_rows(rows, np.arange(len(rows)), accum=1, length=length, pad_id=0)
        mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}
        return loss_sums(parts, params, mb, ce_chunk=64)

    # The same rows with one segment per row (no segment mask) must give a different loss.
    flat = [dataclasses.replace(r, segments=np.ones_like(r.segments)) for r in packed]
    (l_pack, n_pack), (l_single, n_single), (l_flat, _) = jax.jit(
        lambda: (sums(packed, 64), sums(single_rows(examples), 40), sums(flat, 64))
    )()
    n_targets = sum(int(np.sum(e.labels[1:] >= 0)) for e in examples)
    assert float(n_pack) == float(n_single) == n_targets
    assert float(l_pack) == pytest.approx(float(l_single), rel=1e-5)
    assert abs(float(l_flat) - float(l_single)) > 1e-3 * float(l_single)


def test_batch_plan_positions_and_epochs() -> None:
    plan = BatchPlan(num_rows=10, batch_size=4, epochs=2, seed=7)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 6
    epoch0 = np.concatenate([plan.rows_at(s) for s in range(3)])
    assert sorted(epoch0[epoch0 >= 0].tolist()) == list(range(10)) and (epoch0 < 0).sum() == 2
    assert not np.array_equal(plan.permutation(0), plan.permutation(1))
    assert plan.position(4) == {"step": 4, "epoch": 1, "batch_in_epoch": 1}
    with pytest.raises(ValueError, match="other data"):
        plan.check_resume(plan.state(4, "abc"), "abd")


# --- the command: run(), resume, kill, export -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + the character tokenizer, saved as a HF directory."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf("llama", seed=5, layers=1).save_pretrained(out, safe_serialization=True)
    char_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def alpaca_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 short alpaca rows (arithmetic facts)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    with path.open("w") as f:
        for _ in range(40):
            a, b = (int(x) for x in rng.integers(0, 50, size=2))
            row = {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"}
            f.write(json.dumps(row) + "\n")
    return path


def resume_overrides(
    tiny_dir: Path, alpaca_path: Path, workdir: Path, cache: Path
) -> dict[str, Any]:
    """fp32, packed rows of 64, 8 rows per step in 2 micro-batches on a 2 x 2 (data, fsdp)
    mesh, 4 epochs (the resume points cross an epoch boundary)."""
    return {
        "model.path": str(tiny_dir),
        "model.dtype": "float32",
        "data.path": str(alpaca_path),
        "data.packing": True,
        "template": "none",
        "max_length": 64,
        "min_bucket": 64,
        "train.batch_size": 8,
        "train.micro_batch_size": 4,
        "train.epochs": 4,
        "optim.lr": 3e-3,
        "optim.weight_decay": 0.1,
        "optim.warmup_ratio": 0.1,
        "mesh.data": 2,
        "mesh.fsdp": 2,
        "ce_chunk": 32,
        "checkpoint.every": 0,
        "progress": False,
        "compilation_cache_dir": str(cache),
        "workdir": str(workdir),
    }


def run_with(overrides: dict[str, Any]) -> dict[str, Any]:
    return train_main.run(sft_config(overrides))


def exported(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "hf" / "model.safetensors"))


def metric_steps(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_dir: Path, alpaca_path: Path, compile_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[dict[str, Any]]]:
    """The reference run of the resume tests, start to end in one call."""
    workdir = tmp_path_factory.mktemp("straight")
    summary = run_with(resume_overrides(tiny_dir, alpaca_path, workdir, compile_cache))
    return summary, exported(workdir), metric_steps(workdir)


@pytest.mark.slow  # a killed run
def test_sigkill_then_stop_and_resume_equal_uninterrupted(
    uninterrupted: Any, tiny_dir: Path, alpaca_path: Path, compile_cache: Path, tmp_path: Path
) -> None:
    """`python -m resofilter_jax.train`, saving a checkpoint every 2 steps, is SIGKILLed once
    its first checkpoint is on disk. run() on the same workdir resumes from the newest complete
    checkpoint and stops after step 7 (past the first epoch; a checkpoint is forced there); a
    second run() resumes at 7 and finishes. The final weights equal the uninterrupted run's
    (1e-6 relative; in practice bitwise) and metrics.jsonl holds every step once with the same
    losses (what the killed process logged after its last checkpoint is dropped)."""
    summary, want, want_metrics = uninterrupted
    total = summary["steps"]["total"]
    assert summary["steps"]["per_epoch"] < 7 < total
    overrides = resume_overrides(tiny_dir, alpaca_path, tmp_path, compile_cache)
    cli = {**overrides, "checkpoint.every": 2, "checkpoint.use_async": False}
    args = [f"--config.{k}={v}" for k, v in cli.items()]
    cmd = [sys.executable, "-m", "resofilter_jax.train", "--config", "configs/sft_smollm2.py"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd + args, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=err
        )
        ckpt = tmp_path / "checkpoints"
        deadline = time.monotonic() + 300
        try:
            while not (ckpt / "2").is_dir():  # orbax renames a checkpoint dir when complete
                if proc.poll() is not None:
                    pytest.fail(f"training exited early: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("no checkpoint within 300 s")
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert 2 <= saved[-1] < 7, saved  # killed mid-run
    assert not (tmp_path / "hf").exists()
    first = run_with({**overrides, "train.stop_after_steps": 7})
    assert (first["steps"]["start"], first["steps"]["done"]) == (saved[-1], 7)
    assert first["hf_dir"] is None
    second = run_with(overrides)  # a fresh run() call: restores step 7 and its data position
    assert (second["steps"]["start"], second["steps"]["done"]) == (7, total)
    got = exported(tmp_path)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0, err_msg=k)
    got_metrics = metric_steps(tmp_path)
    assert [m["step"] for m in got_metrics] == list(range(1, total + 1))
    assert [m["loss"] for m in got_metrics] == pytest.approx([m["loss"] for m in want_metrics])
    # The lr comes from the restored optimizer's own schedule count: it continues, not restarts.
    assert [m["lr"] for m in got_metrics] == pytest.approx([m["lr"] for m in want_metrics])
    assert len({m["lr"] for m in want_metrics}) > total // 2  # the schedule moves


def test_loss_goes_down_on_gsm8k_and_export_round_trips(
    tiny_dir: Path, gsm8k_path: Path, compile_cache: Path, tmp_path: Path
) -> None:
    """bf16 compute / fp32 master weights, the first 32 GSM8K rows (those with a response
    token left at max_length 256), 30 steps of 4 rows: the loss falls; the exported directory
    loads in transformers with our logits (fp32); run.json is written."""
    summary = run_with(
        {
            "model.path": str(tiny_dir),
            "data.path": str(gsm8k_path),
            "data.limit": 32,
            "template": "none",
            "max_length": 256,
            "min_bucket": 256,  # one padded length: one compiled step
            "train.batch_size": 4,
            "train.max_steps": 30,
            "optim.lr": 1e-2,
            "optim.warmup_ratio": 0.1,
            "mesh.data": 1,
            "ce_chunk": 256,
            "checkpoint.every": 0,
            "progress": False,
            "compilation_cache_dir": str(compile_cache),
            "workdir": str(tmp_path),
        }
    )
    assert summary["data"]["examples"] >= 16 and summary["steps"]["total"] == 30
    losses = [m["loss"] for m in metric_steps(tmp_path)]
    assert len(losses) == 30 and np.isfinite(losses).all()
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.75 * first, (first, last)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["steps"]["done"] == 30 and run["config"]["optim"]["lr"] == 1e-2
    assert run["mesh"] == {"data": 1, "fsdp": 1} and run["final_metrics"]["step"] == 30

    hf_dir = Path(summary["hf_dir"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    ours = load_model(hf_dir)
    initial = (
        tiny_hf("llama", seed=5, layers=1).state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    )
    assert not np.allclose(exported(tmp_path)["model.layers.0.mlp.up_proj.weight"], initial)
    text = "Natalia sold clips to 48 of her friends in April."
    ids = np.asarray([ours.tokenizer(text)["input_ids"]])
    assert ours.tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        want = theirs(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours.model(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --- per-layer rematerialisation ------------------------------------------------------------


@pytest.mark.parametrize(("family", "scan"), [("llama", False), ("gemma2", True), ("gpt2", True)])
def test_remat_policies_keep_the_gradients_and_cut_the_memory(family: str, scan: bool) -> None:
    """`train.remat` (layer, dots) changes what the backward pass stores, not the numbers.

    The gradients equal no remat's (scanned and unrolled layers) to fp32 rounding (GRAD_ERR,
    measured 1.3e-6 of max |g|: the recomputed forward is fused differently); the traced
    gradient holds the checkpoints; with scanned layers (how training runs) XLA's temporary
    buffers of the step shrink by more than half (4 layers, 4 x 64 tokens).
    """
    hf = tiny_hf(family, layers=4)
    rows = single_rows(random_examples(4, seed=3, lo=40, hi=64))
    batch = collate_rows(rows, np.arange(4), accum=1, length=64, pad_id=0)  # [1, 4, 64]
    mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}  # [4, 64]
    grads, temp, remats = {}, {}, {}
    for remat in REMAT_POLICIES:
        model = ours_from(hf)
        model.scan_layers, model.remat = scan, remat
        parts, params = split_model(model)

        def loss(p: dict[str, jax.Array], parts: Any = parts) -> jax.Array:
            return loss_sums(parts, p, mb, ce_chunk=16)[0]

        grad = jax.jit(jax.grad(loss))
        grads[remat] = host(grad(params))
        temp[remat] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
        remats[remat] = str(jax.make_jaxpr(jax.grad(loss))(params)).count("remat")
    for remat in ("layer", "dots"):
        assert remats[remat] > remats["none"], remats  # the CE chunks are remat'd in all
        for k, g in grads["none"].items():
            atol = GRAD_ERR * np.abs(g).max()
            np.testing.assert_allclose(grads[remat][k], g, rtol=0, atol=atol, err_msg=remat + k)
    if scan:  # unrolled, XLA:CPU's schedule hides the saving at this size
        assert temp["layer"] < 0.5 * temp["none"], temp  # measured 0.23-0.32x
        assert temp["dots"] < 0.5 * temp["none"], temp  # measured 0.35-0.42x
    with pytest.raises(ValueError, match="remat must be one of"):
        check_remat("full")


def test_remat_without_scanned_layers_is_flagged_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    """On CPU a remat policy with unscanned layers saves little: the train command says so."""
    with caplog.at_level("WARNING"):
        check_remat("dots", scan_layers=True)
        check_remat("none", scan_layers=False)
        assert "scan_layers=True" not in caplog.text
        check_remat("dots", scan_layers=False)
    assert "remat=dots saves little memory on CPU" in caplog.text
