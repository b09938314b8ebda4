"""The held-out loss during training (``train.eval_every``, ``eval.*``).

A tiny random Llama (``test_train.py``'s, 1 layer, character tokenizer), fp32, packed
training rows, parameters sharded over a (data 2, fsdp 4) mesh of the 8 test devices, 5 steps
with an evaluation every 2 steps: records at steps 2, 4 and 5 (the last), each after its
step's training record; the last one equals the evaluate command's ``heldout_loss`` of the
exported model, and training is the same as without evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from support.training import char_tokenizer, sft_config, tiny_hf

from resofilter_jax.data.sources import read_records
from resofilter_jax.models.loading import load_model
from resofilter_jax.training import metrics as metrics_lib
from resofilter_jax.training import pipeline as train_main
from resofilter_jax.training.evaluation import heldout_loss

STEPS, EVERY = 5, 2
TIMING = ("tokens_per_s", "step_time_s")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A persistent compilation cache: the two runs compile their train step once."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    old = jax.config.jax_compilation_cache_dir
    path = tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", old)
    cc.reset_cache()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + the character tokenizer, saved as a HF directory."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf("llama", seed=5, layers=1).save_pretrained(out, safe_serialization=True)
    char_tokenizer().save_pretrained(out)
    return out


def _write_alpaca(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w") as f:
        for instruction, output in rows:
            f.write(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training file: 40 arithmetic rows, held-out file: 12 rows of two length buckets (32
    and 64 tokens) and one whose prompt alone fills max_length, dropped)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pairs = [tuple(int(x) for x in rng.integers(0, 50, size=2)) for _ in range(52)]
    train = [(f"Add {a} and {b}.", f"{a + b}") for a, b in pairs[:40]]
    held = [(f"Add {a} and {b}.", f"{a + b}") for a, b in pairs[40:48]]
    held += [(f"Add {a} and {b}, then write the sum in digits.", f"{a + b}") for a, b in pairs[48:]]
    held.append(("Add " + " and ".join(str(i) for i in range(30)) + ".", "435"))
    return _write_alpaca(d / "train.jsonl", train), _write_alpaca(d / "held.jsonl", held)


def overrides(tiny_dir: Path, data: tuple[Path, Path], workdir: Path, cache: Path) -> dict:
    return {
        "model.path": str(tiny_dir),
        "model.dtype": "float32",
        "data.path": str(data[0]),
        "data.packing": True,
        "template": "none",
        "max_length": 64,
        "min_bucket": 32,
        "train.batch_size": 8,
        "train.max_steps": STEPS,
        "optim.lr": 3e-3,
        "optim.warmup_ratio": 0.2,
        "mesh.data": 2,
        "mesh.fsdp": 4,
        "ce_chunk": 32,
        "checkpoint.every": 0,
        "progress": False,
        "compilation_cache_dir": str(cache),
        "workdir": str(workdir),
    }


def eval_overrides(data: tuple[Path, Path]) -> dict:
    return {"train.eval_every": EVERY, "eval.path": str(data[1]), "eval.batch_rows": 8}


def records_of(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def exported(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "hf" / "model.safetensors"))


@pytest.fixture(scope="module")
def with_eval(
    tiny_dir: Path, data: tuple[Path, Path], compile_cache: Path, tmp_path_factory: Any
) -> tuple[dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("with_eval")
    cfg = sft_config({**overrides(tiny_dir, data, workdir, compile_cache), **eval_overrides(data)})
    return train_main.run(cfg), workdir


@pytest.fixture(scope="module")
def without_eval(
    tiny_dir: Path, data: tuple[Path, Path], compile_cache: Path, tmp_path_factory: Any
) -> tuple[dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("without_eval")
    return train_main.run(sft_config(overrides(tiny_dir, data, workdir, compile_cache))), workdir


def test_eval_logged_at_steps_and_equals_heldout_loss_of_export(
    with_eval: tuple[dict[str, Any], Path], data: tuple[Path, Path], compile_cache: Path
) -> None:
    """metrics.jsonl: train records 1..5, eval records at 2, 4, 5, each right after its step's
    train record; the last equals ``heldout_loss`` of the exported model (1e-5 relative), and
    is the run summary's / run.json's final eval; TensorBoard has eval/loss if installed."""
    summary, workdir = with_eval
    records = records_of(workdir)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [2, 4, 5]
    for r in evals:
        i = records.index(r)
        assert records[i - 1]["step"] == r["step"] and "loss" in records[i - 1]
        assert set(r) == {"step", "eval_loss", "eval_ppl", "eval_tokens", "eval_time_s"}
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
    assert evals[0]["eval_loss"] != evals[-1]["eval_loss"]  # the current parameters

    ev = summary["eval"]
    assert ev["final"] == evals[-1] and summary["final_metrics"]["step"] == STEPS
    assert "loss" in summary["final_metrics"]
    assert (ev["every"], ev["records"], ev["examples"], ev["batches"]) == (EVERY, 13, 12, 2)
    assert ev["lengths"] == [32, 64] and sum(ev["dropped"].values()) == 1
    run_json = json.loads((workdir / "run.json").read_text())
    assert run_json["eval"]["final"] == evals[-1]

    cfg = sft_config(overrides(Path("unused"), data, workdir, compile_cache))
    records_in, _ = read_records(cfg, str(data[1]), limit=0)
    lm = load_model(workdir / "hf")
    want = heldout_loss(
        lm.model,
        lm.tokenizer,
        records_in,
        template="none",
        max_length=64,
        batch_rows=8,
        min_bucket=32,
        ce_chunk=32,
    )
    assert want["examples"] == 12
    assert evals[-1]["eval_tokens"] == want["tokens"] == ev["target_tokens"]
    assert evals[-1]["eval_loss"] == pytest.approx(want["loss"], rel=1e-5)

    if metrics_lib._tensorboard_writer(workdir / "tb_probe") is None:
        return  # neither tensorboardX nor TensorFlow: no event file to check
    blobs = b"".join(p.read_bytes() for p in (workdir / "tensorboard").rglob("*") if p.is_file())
    assert b"eval/loss" in blobs and b"eval/ppl" in blobs and b"train/loss" in blobs


def test_eval_does_not_change_training(
    with_eval: tuple[dict[str, Any], Path], without_eval: tuple[dict[str, Any], Path]
) -> None:
    """The train records (all but the timings) and the exported weights are the same, bitwise,
    with and without the evaluations."""
    (_, a), (summary_b, b) = with_eval, without_eval
    assert summary_b["eval"] is None

    def train_records(workdir: Path) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.items() if k not in TIMING}
            for r in records_of(workdir)
            if "eval_loss" not in r
        ]

    got, want = train_records(a), train_records(b)
    assert len(want) == STEPS and got == want
    got_w, want_w = exported(a), exported(b)
    assert got_w.keys() == want_w.keys()
    for k in want_w:
        np.testing.assert_array_equal(got_w[k], want_w[k], err_msg=k)


def test_stop_and_resume_logs_the_same_evals(
    with_eval: tuple[dict[str, Any], Path],
    tiny_dir: Path,
    data: tuple[Path, Path],
    compile_cache: Path,
    tmp_path: Path,
) -> None:
    """A run stopped after step 2 (its eval is the last thing it does) and resumed to the end
    writes the uninterrupted run's records: the step-2 eval that the uninterrupted run
    dispatched before step 3 (which donates the parameters) is the same value."""
    _, want_dir = with_eval
    cfg = {**overrides(tiny_dir, data, tmp_path, compile_cache), **eval_overrides(data)}
    first = train_main.run(sft_config({**cfg, "train.stop_after_steps": 2}))
    assert first["eval"]["final"]["step"] == 2
    second = train_main.run(sft_config(cfg))
    assert (second["steps"]["start"], second["eval"]["final"]["step"]) == (2, STEPS)

    def values(workdir: Path) -> list[tuple]:
        return [
            tuple((k, v) for k, v in r.items() if k not in (*TIMING, "eval_time_s"))
            for r in records_of(workdir)
        ]

    got, want = values(tmp_path), values(want_dir)
    assert [r[0] for r in got] == [r[0] for r in want]  # steps, eval records included
    for g, w in zip(got, want, strict=True):
        assert dict(g) == pytest.approx(dict(w), rel=1e-6)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"train.eval_every": 2}, "eval.path"),
        ({"train.eval_every": -1}, "eval_every"),
        ({"train.eval_every": 2, "eval.path": "x.jsonl", "eval.batch_rows": 0}, "batch_rows"),
    ],
)
def test_eval_config_errors(tmp_path: Path, fields: dict[str, Any], match: str) -> None:
    """Refused before the model is loaded (model.path does not exist)."""
    cfg = sft_config({"model.path": str(tmp_path / "missing"), "workdir": str(tmp_path), **fields})
    with pytest.raises(ValueError, match=match):
        train_main.run(cfg)


def test_logger_eval_records_and_tensorboard_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """log_eval: a record of its own, ``eval/<name>`` scalars to the TensorBoard writer (a
    stand-in, whatever is installed); on resume the newest train and eval records are kept
    apart."""
    scalars: list[tuple[str, float, int]] = []

    class Writer:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def close(self) -> None:
            pass

    monkeypatch.setattr(metrics_lib, "_tensorboard_writer", lambda logdir: Writer())
    logger = metrics_lib.MetricsLogger(tmp_path, total_steps=4, progress=False)
    for step in (1, 2):
        logger.log(step, {"loss": 3.0 / step})
    logger.log_eval(2, {"loss": 1.25, "ppl": math.exp(1.25), "tokens": 7})
    logger.log(3, {"loss": 1.0})
    logger.close()
    assert (logger.last["step"], logger.last_eval["step"]) == (3, 2)
    assert ("eval/loss", 1.25, 2) in scalars and ("eval/tokens", 7, 2) in scalars
    assert ("train/loss", 1.5, 2) in scalars
    lines = records_of(tmp_path)
    assert [sorted(r) for r in lines[1:3]] == [
        ["loss", "step"],
        ["eval_loss", "eval_ppl", "eval_tokens", "step"],
    ]
    resumed = metrics_lib.MetricsLogger(tmp_path, total_steps=4, start_step=2, progress=False)
    resumed.close()
    assert resumed.last == {"step": 2, "loss": 1.5} and resumed.last_eval == lines[2]
