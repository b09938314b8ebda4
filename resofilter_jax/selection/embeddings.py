"""Texts and embeddings for Superfiltering.D (facility-location diversity) and the
representation (RDS+) policy.

The reference (Superfiltering ``code_diversity_fla/do_fla.py``) embeds
``instruction + "\\n" + input + "\\n" + output`` per row (``emb_type=whole``; the input line is
there whenever the row has an ``input`` key, so an empty Alpaca input gives ``"...\\n\\n"``)
with all-MiniLM-L6-v2 and L2-normalises the result. Here the embedding is a pooling of the
scoring model's final hidden states, L2-normalised, computed in length-bucketed, token-budget
batches over the mesh's ``data`` axis. Poolings (``POOLINGS``):

* ``mean`` (Superfiltering.D): the masked mean over the real tokens.
* ``weighted_mean`` (RDS+, Ivison et al. 2025, after SGPT): the real tokens' hidden states
  weighted by their 1-based position, ``sum_i i * h_i / sum_i i`` over ``i = 1..n`` (later
  tokens have seen more of the text), so the last token weighs ``n`` times the first.

The selections live in :mod:`resofilter_jax.selection.diversity` and
:mod:`resofilter_jax.selection.representation`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from resofilter_jax.data import Record, bucket_lengths, collate, encode_truncated, plan_batches
from resofilter_jax.models.attention import configure_attention
from resofilter_jax.models.base import CausalLM
from resofilter_jax.models.checks import check_max_length
from resofilter_jax.models.precision import matmul_precision_scope
from resofilter_jax.parallel import make_mesh, num_devices, replicate, shard_batch, traced_on

__all__ = [
    "EMB_TYPES",
    "POOLINGS",
    "EmbType",
    "cached_model",
    "diversity_text",
    "diversity_texts",
    "embed_texts",
    "load_embedder",
    "pooled_embeddings",
]

EmbType = Literal["whole", "instruction", "response"]
EMB_TYPES: tuple[str, ...] = ("whole", "instruction", "response")
POOLINGS: tuple[str, ...] = ("mean", "weighted_mean")
Array = jax.Array


def diversity_text(record: Record, emb_type: EmbType = "whole", *, input_line: bool = True) -> str:
    """The text the reference embeds for one record.

    Args:
        record: The record.
        emb_type: ``whole`` (prompt + output, the default), ``instruction`` or ``response``.
        input_line: Write ``"{instruction}\\n{input}\\n"`` even when the input is empty (the
            reference does whenever the row has an ``input`` key, as every Alpaca row has);
            False gives ``"{instruction}\\n"`` for an empty input (the IFD prompt).
    """
    if record.input or input_line:
        prompt = f"{record.instruction}\n{record.input}\n"
    else:
        prompt = f"{record.instruction}\n"
    if emb_type == "whole":
        return prompt + record.output
    if emb_type == "instruction":
        return prompt
    if emb_type == "response":
        return record.output
    raise ValueError(f"emb_type must be whole, instruction or response, got {emb_type!r}")


def diversity_texts(
    records: Sequence[Record], emb_type: EmbType = "whole", *, input_line: bool = True
) -> list[str]:
    """:func:`diversity_text` of every record, in order."""
    return [diversity_text(r, emb_type, input_line=input_line) for r in records]


@functools.partial(jax.jit, static_argnums=0, static_argnames="pooling")
def pooled_embeddings(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: Array,
    attention_mask: Array,
    pooling: str = "mean",
) -> Array:
    """Unit-norm pooled final hidden states: [B, hidden] float32.

    ``pooling``: ``mean`` (masked mean) or ``weighted_mean`` (weights 1, 2, ..., n over the
    real tokens of a right-padded row). Jitted with the graph and the pooling static, so each
    (model, pooling, batch shape) compiles once per process. Rows with no real token give a
    zero vector.
    """
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(input_ids, attention_mask).astype(jnp.float32)  # [B, L, H]
    real = attention_mask > 0  # [B, L]
    if pooling == "weighted_mean":
        position = jnp.arange(1, input_ids.shape[1] + 1, dtype=jnp.float32)  # [L] 1-based
        weight = jnp.where(real, position[None, :], 0.0)  # [B, L]
    elif pooling == "mean":
        weight = real.astype(jnp.float32)  # [B, L]
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    # where: no NaN from pads reaches the sum
    summed = jnp.where(real[..., None], hidden * weight[..., None], 0.0).sum(axis=1)  # [B, H]
    total = weight.sum(axis=1, keepdims=True)  # [B, 1]
    mean = summed / jnp.maximum(total, 1e-9)  # [B, H]
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)  # [B, 1]
    return mean / jnp.maximum(norm, 1e-12)  # [B, H]


def embed_texts(
    model: CausalLM,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 1024,
    token_budget: int = 16384,
    min_bucket: int = 64,
    mesh: Mesh | None = None,
    progress: bool = False,
    pooling: str = "mean",
) -> np.ndarray:
    """Unit-norm pooled final hidden states of ``texts``: [n, hidden] float32.

    Each text is encoded as ``tokenizer.encode(text, truncation=True, max_length=...)``
    (special tokens as the tokenizer adds them), the sequences are cut into length-bucketed
    token-budget batches, right-padded, split over the mesh's ``data`` axis and run by one
    jitted function per batch shape. Padding never reaches a real token (causal attention,
    masked pooling), so a row does not depend on its batch (up to fp32 noise).

    Args:
        model: The (scoring) causal LM; parameters are replicated over ``mesh``.
        tokenizer: Its HF tokenizer.
        texts: Texts to embed (see :func:`diversity_texts`).
        max_length: Truncation length in tokens.
        token_budget: Padded tokens per batch (rows x bucket length).
        min_bucket: Smallest bucket length (buckets double up to ``max_length``).
        mesh: Device mesh with a ``data`` axis (default: all local devices).
        progress: Show a tqdm bar over texts.
        pooling: ``mean`` or ``weighted_mean`` (see :func:`pooled_embeddings`).
    """
    from resofilter_jax.scoring.shard_loop import RunStats, run_pipelined

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    n, width = len(texts), int(model.config.hidden_size)
    out = np.zeros((n, width), np.float32)  # [n, hidden]
    if n == 0:
        return out
    seqs = [np.asarray(ids, np.int32) for ids in encode_truncated(tokenizer, texts, max_length)]
    lengths = [len(s) for s in seqs]
    buckets = bucket_lengths(max(max_length, *lengths), min(min_bucket, max_length))
    mesh = mesh if mesh is not None else make_mesh()
    plans = plan_batches(
        lengths,
        buckets=buckets,
        token_budget=token_budget,
        batch_multiple=num_devices(mesh),
        pow2_tail=True,
    )
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = [0] * n
    bar = tqdm(total=n, unit="text", desc="embed", disable=not progress)

    def batches() -> Iterator[tuple[None, Any, dict[str, np.ndarray]]]:
        for plan in plans:
            yield None, plan, collate(plan, seqs, starts, pad_id)

    def dispatch(batch: dict[str, np.ndarray]) -> Array:
        arrays = shard_batch({k: batch[k] for k in ("input_ids", "attention_mask")}, mesh)
        ids, mask = arrays["input_ids"], arrays["attention_mask"]
        with traced_on(mesh):
            return pooled_embeddings(graphdef, state, ids, mask, pooling=pooling)

    def collect(_: None, plan: Any, batch: dict, n_tokens: int, result: Array) -> None:
        del batch, n_tokens
        real = plan.rows >= 0  # [B]
        out[plan.rows[real]] = np.asarray(result)[real]
        bar.update(int(real.sum()))

    run_pipelined(
        batches(),
        dispatch=dispatch,
        collect=collect,
        finish=lambda _: None,
        stats=RunStats(),
        shapes=set(),
    )
    bar.close()
    return out


@functools.lru_cache(maxsize=1)
def cached_model(path: str, dtype: str = "float32", param_dtype: str = "float32") -> Any:
    """``load_model(path, ...)``, the last one kept (repeated selections in one process)."""
    from resofilter_jax.models.loading import load_model

    return load_model(path, dtype=dtype, param_dtype=param_dtype)


def load_embedder(
    model_path: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    matmul_precision: str = "highest",
    max_length: int = 1024,
    token_budget: int = 16384,
    num_devices: int = 0,
    progress: bool = False,
    attention: str = "auto",
    pooling: str = "mean",
) -> Callable[[Sequence[str]], np.ndarray]:
    """Loads a model (HF dir, ``.gguf`` file or hub id) and returns ``texts -> [n, hidden]``.

    The function is :func:`embed_texts` (with ``pooling``) over a mesh of the first
    ``num_devices`` local devices (0: all of them). ``attention``: the attention backend
    (models/attention.py).
    """
    lm = cached_model(str(model_path), str(dtype), str(param_dtype))
    check_max_length(lm.config, max_length, lm.source)  # per call: the model may be cached
    configure_attention(lm.model, attention, packed=False)  # one text per row
    devices = jax.local_devices()
    mesh = make_mesh(devices[:num_devices] if num_devices > 0 else devices)

    def embed(texts: Sequence[str]) -> np.ndarray:
        with matmul_precision_scope(matmul_precision):
            return embed_texts(
                lm.model,
                lm.tokenizer,
                texts,
                max_length=max_length,
                token_budget=token_budget,
                mesh=mesh,
                progress=progress,
                pooling=pooling,
            )

    return embed
