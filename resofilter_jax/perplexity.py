"""Response perplexity of instruction data under a causal LM (the default job until scoring lands).

    python -m resofilter_jax.perplexity --config configs/ppl_smollm2_sharegpt.py

For each row, ppl = exp(mean CE of the response tokens given the prompt), with the
conditioned encoding of Superfiltering (DESIGN 3.1). Writes OUTPUT_DIR/perplexity.jsonl (one
row per input row, in order, with a status) and OUTPUT_DIR/summary.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from resofilter_jax import assets
from resofilter_jax.data import (
    bucket_lengths,
    collate,
    encode_ifd_pairs,
    load_records,
    plan_batches,
)
from resofilter_jax.models.loading import load_model
from resofilter_jax.scoring.losses import sequence_losses

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")


def _loss_fn(graphdef: nnx.GraphDef, chunk: int):
    @jax.jit
    def fn(state: nnx.State, input_ids, attention_mask, loss_mask):
        model = nnx.merge(graphdef, state)
        return sequence_losses(model, input_ids, attention_mask, loss_mask, chunk=chunk)

    return fn


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Scores the rows of `config.data` and writes the outputs; returns the summary."""
    t0 = time.perf_counter()
    model_path = config.model.path or str(assets.smollm2_gguf())
    data_path = config.data.path or str(assets.sharegpt_json())
    lm = load_model(model_path, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
    t_load = time.perf_counter()
    records, report = load_records(
        data_path,
        config.data.format,
        sharegpt_turns=config.data.sharegpt_turns,
        on_error=config.data.on_error,
        allow_truncated=config.data.allow_truncated,
    )
    if config.limit:
        records = records[: config.limit]
    pairs = encode_ifd_pairs(
        records, lm.tokenizer, max_length=config.max_length, template=config.template
    )
    ok = [i for i, p in enumerate(pairs) if p.status == "ok"]
    seqs = [pairs[i].cond_ids for i in ok]
    starts = [pairs[i].cond_start for i in ok]
    plans = plan_batches(
        [len(s) for s in seqs],
        buckets=bucket_lengths(config.max_length, config.min_bucket),
        token_budget=config.token_budget,
        pow2_tail=True,
    )
    graphdef, state = nnx.split(lm.model)
    fn = _loss_fn(graphdef, config.chunk)
    pad_id = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
    loss = np.full(len(pairs), np.nan)
    count = np.zeros(len(pairs), np.int64)
    n_tokens = 0
    t_start = time.perf_counter()
    with tqdm(total=len(seqs), unit="sample", desc="perplexity") as bar:
        for plan in plans:
            batch = collate(plan, seqs, starts, pad_id)
            s, c = fn(state, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            s, c = np.asarray(s), np.asarray(c)
            for b, item in enumerate(plan.rows.tolist()):
                if item >= 0:
                    loss[ok[item]] = s[b] / max(c[b], 1.0)
                    count[ok[item]] = int(c[b])
            n_tokens += int(batch["attention_mask"].sum())
            bar.update(len(plan.items))
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t_start):.0f}")
    t_end = time.perf_counter()

    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "perplexity.jsonl", "w") as f:
        for p, r, lo, n in zip(pairs, records, loss, count, strict=True):
            row = {
                "index": r.index,
                "turn": r.turn,
                "id": r.id,
                "status": p.status,
                "loss": None if math.isnan(lo) else float(lo),
                "ppl": None if math.isnan(lo) else float(math.exp(lo)),
                "n_tokens": int(n),
            }
            f.write(json.dumps(row) + "\n")
    good = loss[~np.isnan(loss)]
    summary = {
        "model": model_path,
        "data": data_path,
        "rows": len(pairs),
        "scored": int(good.size),
        "statuses": {
            s: sum(p.status == s for p in pairs) for s in sorted({p.status for p in pairs})
        },
        "mean_loss": float(good.mean()) if good.size else None,
        "ppl_of_mean_loss": float(math.exp(good.mean())) if good.size else None,
        "median_ppl": float(np.median(np.exp(good))) if good.size else None,
        "tokens": n_tokens,
        "devices": [str(d) for d in jax.devices()],
        "seconds": {"load": t_load - t0, "score": t_end - t_start, "total": t_end - t0},
        "samples_per_s": len(seqs) / max(t_end - t_start, 1e-9),
        "read_report": report.message or None,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str]) -> None:
    del argv
    summary = run(_CONFIG.value)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
