"""The ``representation`` policy: RDS+ (Ivison et al. 2025, "Large-Scale Data Selection for
Instruction Tuning") over the scored rows.

* Texts: each candidate (a scored row, ``status == ok``) and each target (an ok record of
  ``--target``, the first ``--target_limit`` of them) as the whole formatted example: the
  scorer's template (``run_config.json``; ``none`` when not recorded) prompt followed by its
  response, ``template.prompt(r) + template.response(r)``, tokenised as one text (special
  tokens as the tokenizer adds them, truncated to ``max_length``).
* Embeddings: the scoring model's (``--model`` overrides) final hidden states, position-
  weighted mean (``weighted_mean`` in :mod:`~resofilter_jax.selection.embeddings`), L2-
  normalised; batched over the mesh by ``embed_texts``, ``TEXT_CHUNK`` texts per call, and
  cached next to the score file (:mod:`~resofilter_jax.selection.embedding_cache`).
* Score (``rds_score``): a candidate's maximum cosine over the targets; ``rds_target`` is
  the row number (``index``) in ``--target`` of the target whose turn picked the row
  (round-robin) or of the most similar target (top-k).
* Selection: round-robin over the targets (:func:`~resofilter_jax.selection.target.round_robin`)
  or, with ``round_robin=False``, the top k by ``rds_score``; ties: the earlier row.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from resofilter_jax.data import Record, Template, iter_raw_rows, to_records
from resofilter_jax.data.sources import naming_the_file
from resofilter_jax.scoring.outputs import path_stamp
from resofilter_jax.selection.assemble import ScoreKeys
from resofilter_jax.selection.embedding_cache import EmbeddingCache
from resofilter_jax.selection.rows import ScoredData
from resofilter_jax.selection.settings import embedding_model, scored_template
from resofilter_jax.selection.target import Picks, max_cosine, round_robin, top_k

if TYPE_CHECKING:
    from resofilter_jax.selection.pipeline import SelectConfig

__all__ = [
    "BLOCK",
    "POOLING",
    "TEXT_CHUNK",
    "formatted_text",
    "read_targets",
    "select_representation",
]

POOLING = "weighted_mean"
TEXT_CHUNK = 16384  # texts per embedding call: bounded memory for the texts
BLOCK = 1 << 15  # candidate rows per similarity block


def formatted_text(record: Record, template: Template) -> str:
    """The whole formatted example: the template's prompt followed by its response."""
    return template.prompt(record) + template.response(record)


def read_targets(
    path: str,
    *,
    fmt: str = "auto",
    limit: int = 0,
    sharegpt_turns: str = "first",
    reader: str = "auto",
) -> tuple[list[Record], int]:
    """The first ``limit`` (0: all) ok records of ``path`` and how many unusable ones were
    skipped before the last of them."""
    rows = iter_raw_rows(path, reader=reader, on_error="status", allow_truncated=True)
    records = naming_the_file(
        to_records(rows, fmt, sharegpt_turns=sharegpt_turns, on_error="status"),  # type: ignore[arg-type]
        path,
    )
    ok: list[Record] = []
    skipped = 0
    for r in records:
        if not r.ok:
            skipped += 1
            continue
        ok.append(r)
        if limit and len(ok) == limit:
            break
    return ok, skipped


def _keys_digest(index: np.ndarray, turn: np.ndarray) -> str:
    """SHA-256 of the candidates' (index, turn) keys."""
    h = hashlib.sha256(np.ascontiguousarray(index, np.int64).tobytes())
    h.update(np.ascontiguousarray(turn, np.int64).tobytes())
    return h.hexdigest()


def _model_settings(spec: dict[str, Any], template: str) -> dict[str, Any]:
    """What the embeddings depend on besides the rows."""
    return {
        "model": path_stamp(spec["model_path"]),
        **{k: spec[k] for k in ("dtype", "param_dtype", "matmul_precision", "max_length")},
        "pooling": POOLING,
        "template": template,
        "text": "prompt+response",
    }


class _Embedder:
    """Loads the model on first use (a fully cached selection never loads it)."""

    def __init__(self, config: SelectConfig, spec: dict[str, Any], template: str) -> None:
        self.config, self.spec, self.template_name = config, spec, template
        self.seconds = {"load_model": 0.0, "embedding": 0.0}
        self._embed: Any = None

    def load(self) -> tuple[Any, Template, int]:
        """``(embed, template, hidden size)``."""
        from resofilter_jax.data import get_template
        from resofilter_jax.selection.embeddings import cached_model, load_embedder

        t0 = time.perf_counter()
        lm = cached_model(self.spec["model_path"], self.spec["dtype"], self.spec["param_dtype"])
        if self._embed is None:
            self._embed = load_embedder(
                **self.spec,
                token_budget=self.config.token_budget,
                num_devices=self.config.num_devices,
                progress=self.config.progress,
                pooling=POOLING,
            )
        self.seconds["load_model"] += time.perf_counter() - t0
        template = get_template(self.template_name, lm.tokenizer)
        return self._embed, template, int(lm.model.config.hidden_size)

    def fill(self, out: np.ndarray, records: Iterator[Record]) -> None:
        """Embeds the formatted texts of ``records`` into the rows of ``out``, in order."""
        embed, template, _ = self.load()
        t0 = time.perf_counter()
        row, chunk = 0, []
        for r in records:
            chunk.append(formatted_text(r, template))
            if len(chunk) == TEXT_CHUNK:
                out[row : row + len(chunk)] = embed(chunk)
                row, chunk = row + len(chunk), []
        if chunk:
            out[row : row + len(chunk)] = embed(chunk)
            row += len(chunk)
        if row != len(out):
            raise ValueError(f"{row} records for {len(out)} embedding rows")
        self.seconds["embedding"] += time.perf_counter() - t0


def select_representation(
    config: SelectConfig,
    keys: ScoreKeys,
    ok: np.ndarray,
    source: ScoredData,
    k_of: Callable[[int], int],
) -> Picks:
    """RDS+ over the ok rows (``ok`` [n]) of the score file (module docstring).

    Args:
        config: The selection (target, target_format, target_limit, round_robin, model...).
        keys: The score file's row keys.
        ok: [n] bool, the candidates.
        source: The scored data (``--data``).
        k_of: ``k_of(candidates) -> k``, the budget.
    """
    if not source.data:
        raise ValueError("--policy representation needs --data (the scored rows are embedded)")
    targets, skipped = read_targets(
        config.target,
        fmt=config.target_format,
        limit=config.target_limit,
        sharegpt_turns=config.sharegpt_turns or "first",
    )
    if not targets:
        raise ValueError(f"{config.target} has no usable target rows")
    cand = keys.data_order(np.nonzero(ok)[0])  # [N] score-file rows in input order
    index, turn = keys.index[cand], keys.turns(cand)
    spec = embedding_model(config.scores, config.model, config.dtype, config.max_length)
    template = scored_template(config.scores)
    model = _model_settings(spec, template)
    opts = source.record_options()
    cand_settings = {
        **model,
        "rows": {
            "data": path_stamp(source.data),
            **{k: opts[k] for k in ("fmt", "fields", "sharegpt_turns", "reader")},
            "keys": _keys_digest(index, turn),
            "count": len(cand),
        },
    }
    target_settings = {
        **model,
        "rows": {
            "target": path_stamp(config.target),
            "format": config.target_format,
            "sharegpt_turns": config.sharegpt_turns or "first",
            "limit": config.target_limit,
            "count": len(targets),
        },
    }
    cache = EmbeddingCache(config.scores)
    embedder = _Embedder(config, spec, template)
    arrays, reused = {}, {}
    for kind, settings, records in (
        ("targets", target_settings, lambda: iter(targets)),
        ("candidates", cand_settings, lambda: source.iter_records(index, turn)),
    ):
        x = cache.load(kind, settings)
        reused[kind] = x is not None
        if x is None:
            _, _, width = embedder.load()
            shape = (settings["rows"]["count"], width)
            x = cache.store(
                kind, settings, shape, lambda out, rec=records: embedder.fill(out, rec())
            )
        arrays[kind] = x
    emb, targ = arrays["candidates"], np.asarray(arrays["targets"])  # [N, H], [T, H]

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, len(emb), BLOCK):
            yield s, emb[s : s + BLOCK]

    t0 = time.perf_counter()
    scores = max_cosine(blocks, targ, len(emb))
    usable = int(np.isfinite(scores.score).sum())
    k = k_of(usable)
    rr = config.round_robin is not False
    if rr:
        rows, picker = round_robin(blocks, targ, usable, k)
    else:
        rows = top_k(scores.score, k)
        picker = scores.nearest[rows]
    select_s = time.perf_counter() - t0
    positions = cand[rows]
    target_index = np.asarray([t.index for t in targets], np.int64)
    extra = {
        "rds_score": dict(zip(positions.tolist(), scores.score[rows].tolist(), strict=True)),
        "rds_target": dict(zip(positions.tolist(), target_index[picker].tolist(), strict=True)),
    }
    info = {
        "candidates": usable,
        "targets": len(targets),
        "targets_skipped": skipped,
        "round_robin": rr,
        "model": spec["model_path"],
        "max_length": spec["max_length"],
        "pooling": POOLING,
        "template": template,
        "embeddings": {
            kind: {"file": str(cache.paths(kind, s)[0]), "reused": reused[kind]}
            for kind, s in (("candidates", cand_settings), ("targets", target_settings))
        },
        "seconds": {**embedder.seconds, "select": select_s},
    }
    every = np.full(len(keys.index), np.nan)  # [n] score-file order
    every[cand] = scores.score
    return Picks(positions, extra, info, {"rds_score": every})
