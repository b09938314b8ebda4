"""A disk cache of encoded shards: tokenize a dataset once per tokenizer and encoding.

Tokenization is most of a scoring job's host time (BENCHMARKS.md, host pipeline). Every
encoding of a shard's records depends only on the records, the tokenizer, the template and
the encoding's settings; a cache keyed by exactly those lets a re-run (``overwrite``), a run
of another model that shares the tokenizer, or a run in another dtype skip it.

Layout: ``ROOT/<key>/key.json`` (what the key hashes) and ``ROOT/<key>/rows-LO-HI.parquet``,
one file per encoded range of rows, written atomically. A file is used only if its row
count matches; anything unreadable is recomputed. The key holds:

* the encoding (``ifd`` pairs or ``sft`` examples) and its settings (``max_length``),
* the template (its name, and the chat template's text for ``chat``),
* the tokenizer: sha256 of its complete serialized form (vocabulary, merges, normalizer,
  pre-tokenizer, post-processor, added tokens),
* the data: the caller's stamp (path, size, mtime, format, field map, turns, limit, ...),
* the code: sha256 of ``encoding.py``, ``host_tokenize.py``, ``templates.py`` and
  ``formats.py``, so a change to
  how records are read or tokenized never reuses an old encoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resofilter_jax.data.atomic import atomic_write_table
from resofilter_jax.data.encoding import IFDPair, SFTExample

KINDS: dict[str, type] = {"ifd": IFDPair, "sft": SFTExample}


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's complete serialized form (a fast tokenizer's JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("the encoded-shard cache needs a fast (Rust) tokenizer")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def code_digest() -> str:
    """sha256 of the modules whose code decides a record's text and its encoding."""
    from resofilter_jax.data import encoding, formats, host_tokenize, templates

    h = hashlib.sha256()
    for module in (encoding, formats, host_tokenize, templates):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _to_table(items: Sequence[Any], cls: type) -> pa.Table:
    """Encoded items as columns: integer arrays as list<int32>, the rest as scalars."""
    columns = {}
    for f in dataclasses.fields(cls):
        values = [getattr(x, f.name) for x in items]
        if values and isinstance(values[0], np.ndarray):
            columns[f.name] = pa.array([v.tolist() for v in values], pa.list_(pa.int32()))
        else:
            columns[f.name] = pa.array(values)
    return pa.table(columns)


def _from_table(table: pa.Table, cls: type) -> list[Any]:
    cols = {}
    for f in dataclasses.fields(cls):
        col = table.column(f.name)
        if pa.types.is_list(col.type):  # one flat int32 copy, sliced per row
            flat = col.combine_chunks()
            values = np.array(flat.values.to_numpy(zero_copy_only=False), np.int32)  # writable
            offsets = flat.offsets.to_numpy()
            cols[f.name] = [values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        else:
            cols[f.name] = col.to_pylist()
    n = table.num_rows
    return [cls(**{k: cols[k][i] for k in cols}) for i in range(n)]


class EncodedCache:
    """Encoded shards of one (encoding, template, tokenizer, data) key under ``root``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        kind: str,
        tokenizer: Any,
        template: str,
        settings: dict[str, Any],
        data: dict[str, Any],
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        chat = getattr(tokenizer, "chat_template", None) if template == "chat" else None
        self.key = {
            "kind": kind,
            "template": template,
            "chat_template": chat,
            "settings": settings,
            "tokenizer_sha256": tokenizer_digest(tokenizer),
            "data": data,
            "code_sha256": code_digest(),
        }
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.dir = Path(root).expanduser() / f"{kind}-{digest[:20]}"
        self.cls = KINDS[kind]
        self.hits = 0
        self.misses = 0

    def _path(self, lo: int, hi: int) -> Path:
        return self.dir / f"rows-{lo:012d}-{hi:012d}.parquet"

    def get_or_encode(self, lo: int, hi: int, n: int, encode: Callable[[], list[Any]]) -> list[Any]:
        """The ``n`` encoded items of rows ``[lo, hi)``: from the cache, or ``encode()``d and
        stored."""
        path = self._path(lo, hi)
        if path.is_file():
            try:
                table = pq.read_table(path)
                if table.num_rows == n:
                    self.hits += 1
                    return _from_table(table, self.cls)
            except (OSError, pa.ArrowException, KeyError):
                pass  # unreadable or from another version: recompute below
        items = encode()
        self.misses += 1
        self._store(path, items)
        return items

    def _store(self, path: Path, items: Sequence[Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.is_file():
            key_file.write_text(json.dumps(self.key, indent=2, sort_keys=True))
        atomic_write_table(path, _to_table(items, self.cls))
