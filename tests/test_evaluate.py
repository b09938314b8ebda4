"""Evaluation: answer extraction, generation prompts, held-out loss and greedy decoding against
transformers on the real SmolLM2 weights, and the command end to end."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resofilter_jax.data import IGNORE_INDEX, encode_sft_examples, iter_raw_rows, to_records
from resofilter_jax.models.generate import cut_at_stop
from resofilter_jax.training.evaluation import (
    extract_answer,
    generation_prompts,
    gsm8k_accuracy,
    heldout_loss,
    normalize_answer,
    run,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("She pays 3 * 2 = 6 dollars.\n#### 6", "6"),
        ("#### 1,250", "1250"),
        ("so the answer is $18.00.", "18"),
        ("first 3 then 4.5 and finally -2", "-2"),
        ("#### 0.5", "0.5"),
        ("The total is 7. #### 7\nExtra 9", "7"),
        ("no number here", None),
    ],
)
def test_extract_answer(text: str, want: str | None) -> None:
    assert extract_answer(text) == want


def test_normalize_answer_compares_numbers_as_numbers() -> None:
    assert normalize_answer("18.0") == normalize_answer("18") == "18"
    assert normalize_answer(" 1,000. ") == "1000"
    assert normalize_answer("abc") == "abc"


def _records(path: Path, n: int) -> list:
    rows = iter_raw_rows(str(path), on_error="raise", allow_truncated=False)
    return [r for _, r in zip(range(n), to_records(rows, "gsm8k"), strict=False)]


def test_generation_prompt_is_the_training_prefix(smollm2, gsm8k_path: Path) -> None:
    """The prompt the model decodes from is exactly how its training sequences begin."""
    tok = smollm2.tokenizer
    records = _records(gsm8k_path, 4)
    prompts, stops = generation_prompts(records, tok, "chatml")
    examples = encode_sft_examples(records, tok, max_length=4096, template="chatml")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stops and tok.eos_token_id in stops
    for p, ex in zip(prompts, examples, strict=True):
        assert list(ex.ids[: len(p)]) == p
        assert tok.decode(p).endswith("<|im_start|>assistant\n")


def test_heldout_loss_matches_transformers(smollm2, smollm2_torch, gsm8k_path: Path) -> None:
    records = _records(gsm8k_path, 5)
    got = heldout_loss(
        smollm2.model, smollm2.tokenizer, records, template="chatml", max_length=256, batch_rows=4
    )
    examples = encode_sft_examples(records, smollm2.tokenizer, max_length=256, template="chatml")
    sums, counts = [], []
    with torch.no_grad():
        for ex in examples:
            ids = torch.from_numpy(ex.ids[None].astype(np.int64))
            logits = smollm2_torch(input_ids=ids).logits[0, :-1].double()  # [n - 1, vocab]
            labels = torch.from_numpy(ex.labels[1:].astype(np.int64))
            ce = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            valid = labels != IGNORE_INDEX
            sums.append(float(ce[valid].sum()))
            counts.append(int(valid.sum()))
    want = sum(sums) / sum(counts)
    assert got["tokens"] == sum(counts)
    assert got["loss"] == pytest.approx(want, rel=1e-4)
    assert got["ppl"] == pytest.approx(np.exp(want), rel=1e-4)
    per_example = [s / c for s, c in zip(sums, counts, strict=True)]
    np.testing.assert_allclose(list(got["per_example"].values()), per_example, rtol=1e-4)


def test_gsm8k_greedy_decoding_matches_transformers(
    smollm2, smollm2_torch, gsm8k_path: Path
) -> None:
    tok = smollm2.tokenizer
    records = _records(gsm8k_path, 2)
    metrics, rows = gsm8k_accuracy(
        smollm2.model, tok, records, template="chatml", max_new_tokens=24, batch_size=2
    )
    assert metrics["examples"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
    prompts, stops = generation_prompts(records, tok, "chatml")
    for prompt, row in zip(prompts, rows, strict=True):
        with torch.no_grad():
            out = smollm2_torch.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        want = cut_at_stop(out[0, len(prompt) :].tolist(), stops)
        assert row["generated"] == tok.decode(want, skip_special_tokens=True)
        assert row["gold"] == extract_answer(records[row["index"]].output)


def test_evaluate_command_end_to_end(tmp_path: Path, gsm8k_path: Path) -> None:
    out_dir = tmp_path / "eval"
    cmd = [
        sys.executable,
        "-m",
        "resofilter_jax.evaluate",
        "--config",
        str(REPO / "configs/eval_smollm2_gsm8k.py"),
        f"--config.data.path={gsm8k_path}",
        "--config.data.limit=3",
        "--config.generate.max_new_tokens=8",
        "--config.generate.batch_size=4",
        f"--config.output_dir={out_dir}",
        "--config.progress=False",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out_dir / "eval.json").read_text())
    assert result["rows"] == 3
    assert result["loss"]["examples"] == 3 and np.isfinite(result["loss"]["loss"])
    assert result["gsm8k"]["examples"] == 3
    preds = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == [0, 1, 2]


def test_evaluate_rejects_unknown_task(tmp_path: Path) -> None:
    cfg = runpy.run_path(str(REPO / "configs/eval_smollm2_gsm8k.py"))["get_config"]()
    cfg.tasks = "loss,mmlu"
    cfg.output_dir = str(tmp_path)
    with pytest.raises(ValueError, match="mmlu"):
        run(cfg)
