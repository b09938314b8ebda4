"""Synthetic scored pools for the select / analyze benchmarks and tests, in bounded memory.

    python bench/make_pool.py --rows 10000000 --out /tmp/pool_10m [--format alpaca|sharegpt] \
        [--turns first|all] [--data data.jsonl|data.json] [--reso_params 3] [--score_jsonl]

Writes, chunk by chunk (``--chunk_rows`` input rows at a time, one Parquet row group each):

    OUT/data.jsonl                 the input rows (alpaca ``{"id", "instruction", "input",
                                   "output"}`` or ShareGPT ``{"id", "conversations"}``)
    OUT/ifd/scores.parquet         an IFD score file as the scorer merges it (SHARD_SCHEMA,
    OUT/ifd_b/scores.parquet       ``turn`` only in ShareGPT "all" mode), and a second IFD
                                   run of the same rows (another model: correlated values)
    OUT/reso/scores.parquet        a resonance score file (``reso_schema`` of the first
                                   ``--reso_params`` MLP matrices: 88 feature columns for 3)
    OUT/*/run_config.json          the scorer's data settings, which select reads back

Every row's kind is a hash of its number, so the files agree without holding the pool: about
0.1% unreadable rows (a cut JSONL line or a ``null`` array element: ``error:...`` with NaN
scores everywhere), 0.5% empty outputs (IFD ``empty_output``), 0.2% ``no_response_tokens``,
and 2% rows that repeat an earlier row's query (resonance ``duplicate_of:<i>``, NaN score).
Texts come from a fixed pool of sentences with quotes, backslashes, tabs, newlines and
non-ASCII characters, so JSON escaping is exercised. The functions are imported by
``tests/test_select_large.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Row kinds (a hash of the row number decides).
OK, BAD, EMPTY, NO_RESPONSE, DUPLICATE = 0, 1, 2, 3, 4
_RATES = ((BAD, 0.001), (EMPTY, 0.005), (NO_RESPONSE, 0.002), (DUPLICATE, 0.02))
_WORDS = (
    "the model data answer question step list write explain why how number value code "
    'function "quoted" back\\slash tab\there new\nline café naïve 日本語 emoji🙂 résumé 42 '
    "3.14 ok table sort filter score rank keep drop rate pool row column file"
).split(" ")
_N_SENTENCES = 4096


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """What a pool holds.

    Attributes:
        rows: Input rows.
        fmt: ``alpaca`` or ``sharegpt``.
        turns: ShareGPT mode: ``first`` (one record per row) or ``all`` (1-3 per row).
        reso_params: MLP matrices in the resonance file (0: no resonance file).
        seed: Seed of the hashes and the scores.
        chunk_rows: Input rows per chunk (one Parquet row group).
        data_name: ``data.jsonl`` (JSONL) or ``data.json`` (one JSON array).
        score_jsonl: Also write each ``scores.jsonl`` (as the scorer does; large).
        write_data: Write the data file (False: score files only).
    """

    rows: int
    fmt: str = "alpaca"
    turns: str = "first"
    reso_params: int = 3
    seed: int = 0
    chunk_rows: int = 1 << 20
    data_name: str = "data.jsonl"
    score_jsonl: bool = False
    write_data: bool = True


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 values."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash(rows: np.ndarray, salt: int, seed: int) -> np.ndarray:
    """[m] uint64 hash of each row number."""
    with np.errstate(over="ignore"):
        key = rows.astype(np.uint64) * np.uint64(0x100000001B3) + np.uint64(salt * 7919 + seed)
    return _mix(_mix(key))


def _unit(rows: np.ndarray, salt: int, seed: int) -> np.ndarray:
    """[m] float64 in [0, 1)."""
    return (_hash(rows, salt, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_kind(rows: np.ndarray, seed: int) -> np.ndarray:
    """[m] kind of each row number (OK, BAD, EMPTY, NO_RESPONSE, DUPLICATE)."""
    u = _unit(rows, 1, seed)
    kind = np.full(len(rows), OK, np.int8)
    edge = 0.0
    for k, rate in _RATES:
        kind[(u >= edge) & (u < edge + rate)] = k
        edge += rate
    return kind


def _plan(start: int, stop: int, spec: PoolSpec) -> dict[str, np.ndarray]:
    """Per input row of [start, stop): kind, duplicated row, turns and sentence choices."""
    rows = np.arange(start, stop, dtype=np.int64)
    kind = row_kind(rows, spec.seed)
    target = (_hash(rows, 2, spec.seed) % np.maximum(rows, 1).astype(np.uint64)).astype(np.int64)
    dup = (kind == DUPLICATE) & (rows > 0)
    dup &= row_kind(target, spec.seed) == OK  # copies of readable, scored rows only
    kind[(kind == DUPLICATE) & ~dup] = OK
    source = np.where(dup, target, rows)  # the row whose query this row repeats
    many = spec.fmt == "sharegpt" and spec.turns == "all"
    turns = 1 + (_hash(source, 3, spec.seed) % np.uint64(3)).astype(np.int64) if many else None
    n_turns = np.where(kind == BAD, 1, turns) if many else np.ones(len(rows), np.int64)
    return {"rows": rows, "kind": kind, "source": source, "n_turns": n_turns}


def _sentences(seed: int) -> list[str]:
    """The JSON-escaped sentence pool (escaping is per character, so pieces concatenate)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(_N_SENTENCES):
        words = rng.choice(len(_WORDS), size=int(rng.integers(3, 25)))
        text = " ".join(_WORDS[w] for w in words)
        out.append(json.dumps(text, ensure_ascii=False)[1:-1])
    return out


def _texts(rows: np.ndarray, salt: int, seed: int) -> list[int]:
    return (_hash(rows, salt, seed) % np.uint64(_N_SENTENCES)).astype(np.int64).tolist()


def _data_lines(plan: dict[str, np.ndarray], spec: PoolSpec, s: list[str]) -> Iterator[str]:
    """The JSON text of each input row (None-like rows for unreadable ones)."""
    rows, kind, source = plan["rows"], plan["kind"], plan["source"]
    q1, q2 = _texts(source, 10, spec.seed), _texts(source, 11, spec.seed)
    a1, a2 = _texts(rows, 12, spec.seed), _texts(rows, 13, spec.seed)
    has_input = (_unit(source, 14, spec.seed) < 0.6).tolist()
    array = spec.data_name.endswith(".json")
    for j, (i, k, src, n) in enumerate(
        zip(rows.tolist(), kind.tolist(), source.tolist(), plan["n_turns"].tolist(), strict=True)
    ):
        if k == BAD:
            yield "null" if array else f'{{"id": "r{i}", "instruction": "cut'
            continue
        out = "" if k == EMPTY else f"{s[a1[j]]} {s[a2[j]]} (answer {i})"
        if spec.fmt == "alpaca":
            inp = s[q2[j]] if has_input[j] else ""
            yield (
                f'{{"id": "r{i}", "instruction": "{s[q1[j]]} (task {src})", '
                f'"input": "{inp}", "output": "{out}"}}'
            )
            continue
        turns = []
        for t in range(n):
            human = f"{s[q1[j]]} (task {src} turn {t})" + (f"\\n{s[q2[j]]}" if t else "")
            gpt = out if t == 0 else f"{s[a2[j]]} (answer {i}.{t})"
            turns.append(f'{{"from": "human", "value": "{human}"}}')
            turns.append(f'{{"from": "gpt", "value": "{gpt}"}}')
        yield f'{{"id": "r{i}", "conversations": [{", ".join(turns)}]}}'


def ifd_schema(spec: PoolSpec) -> pa.Schema:
    """The merged IFD file's columns (``turn`` only in ShareGPT "all" mode)."""
    from resofilter_jax.scoring.outputs import SHARD_SCHEMA

    keep_turn = spec.fmt == "sharegpt" and spec.turns == "all"
    return pa.schema([f for f in SHARD_SCHEMA if f.name != "turn" or keep_turn])


def reso_param_names(spec: PoolSpec) -> tuple[str, ...]:
    """The MLP matrices of the resonance file (the last ``reso_params`` of a 30-layer model)."""
    return tuple(f"model.layers.{29 - k}.mlp.up_proj.weight" for k in range(spec.reso_params))[::-1]


def reso_file_schema(spec: PoolSpec) -> pa.Schema:
    """``reso_runner.reso_schema`` of those matrices, less ``turn`` outside "all" mode."""
    from resofilter_jax.scoring.reso_features import ResonanceSpec
    from resofilter_jax.scoring.reso_runner import reso_schema

    schema = reso_schema(ResonanceSpec(params=reso_param_names(spec)))
    keep_turn = spec.fmt == "sharegpt" and spec.turns == "all"
    return pa.schema([f for f in schema if f.name != "turn" or keep_turn])


def _score_tables(
    plan: dict[str, np.ndarray], spec: PoolSpec, schemas: dict[str, pa.Schema]
) -> dict[str, pa.Table]:
    """The score rows of one chunk: ``ifd``, ``ifd_b`` and ``reso`` tables."""
    n_turns = plan["n_turns"]
    index = np.repeat(plan["rows"], n_turns)  # [m] one score row per record
    first = np.cumsum(n_turns) - n_turns
    turn = np.arange(len(index)) - np.repeat(first, n_turns)
    kind = np.repeat(plan["kind"], n_turns)
    source = np.repeat(plan["source"], n_turns)
    kind = np.where((turn > 0) & np.isin(kind, (EMPTY, NO_RESPONSE)), OK, kind)
    m = len(index)
    rng = np.random.default_rng([spec.seed, int(plan["rows"][0]) if m else 0])
    ids = pa.array([None if k == BAD else f"r{i}" for i, k in zip(index, kind, strict=True)])
    status_of = {OK: "ok", BAD: "error:bad_json", EMPTY: "empty_output"}
    status_of[NO_RESPONSE] = "no_response_tokens"
    if spec.data_name.endswith(".json"):
        status_of[BAD] = "error:not_an_object"
    base = np.array([status_of[k] for k in (OK, BAD, EMPTY, NO_RESPONSE)], object)
    ifd_kind = np.where(kind == DUPLICATE, OK, kind)  # IFD scores duplicates
    ifd_status = base[ifd_kind]
    ifd_ok = ifd_kind == OK
    tables = {}
    ifd = rng.lognormal(-0.25, 0.25, m)
    for name, values in (("ifd", ifd), ("ifd_b", ifd * rng.lognormal(0.0, 0.15, m))):
        loss_d = rng.uniform(0.5, 3.0, m)
        cols = {
            "index": index,
            "id": ids,
            "turn": turn,
            "status": ifd_status,
            "loss_direct": np.where(ifd_ok, loss_d, np.nan),
            "loss_condition": np.where(ifd_ok, loss_d + np.log(values), np.nan),
            "ppl_direct": np.where(ifd_ok, np.exp(loss_d), np.nan),
            "ppl_condition": np.where(ifd_ok, np.exp(loss_d) * values, np.nan),
            "ifd": np.where(ifd_ok, values, np.nan),
            "n_tokens_direct": np.where(ifd_ok, rng.integers(1, 400, m), 0),
            "n_tokens_condition": np.where(ifd_ok, rng.integers(1, 400, m), 0),
        }
        tables[name] = _table(cols, schemas["ifd"])
    if spec.reso_params:
        reso_kind = np.where(kind == EMPTY, OK, kind)  # an empty output is still scored
        reso_ok = reso_kind == OK
        dup_status = np.char.add("duplicate_of:", source.astype(str)).astype(object)
        status = np.where(reso_kind == DUPLICATE, dup_status, base[np.minimum(reso_kind, 3)])
        score = 1e-5 * rng.lognormal(0.0, 0.05, m)
        cols = {"index": index, "id": ids, "turn": turn, "status": status}
        cols["score"] = np.where(reso_ok, score, np.nan)
        loss = rng.uniform(0.3, 2.5, m)
        cols["loss"] = np.where(reso_ok, loss, np.nan)
        cols["ppl"] = np.where(reso_ok, np.exp(loss), np.nan)
        cols["n_tokens"] = np.where(reso_ok, rng.integers(2, 700, m), 0)
        for f in schemas["reso"]:
            if f.name in cols or f.name == "turn":
                continue
            if pa.types.is_integer(f.type):
                cols[f.name] = np.where(reso_ok, rng.integers(0, 1 << 20, m), -1)
            elif f.name.endswith("/mean_abs"):
                cols[f.name] = np.where(reso_ok, score * rng.lognormal(0.0, 0.02, m), np.nan)
            else:
                cols[f.name] = np.where(reso_ok, rng.random(m), np.nan)
        tables["reso"] = _table(cols, schemas["reso"])
    return tables


def _table(cols: dict[str, Any], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def make_pool(out: str | Path, spec: PoolSpec, *, log: bool = False) -> dict[str, Path]:
    """Writes a pool into ``out``; returns the paths (``data``, ``ifd``, ``ifd_b``, ``reso``)."""
    root = Path(out)
    schemas = {"ifd": ifd_schema(spec)}
    names = ["ifd", "ifd_b"]
    if spec.reso_params:
        schemas["reso"] = reso_file_schema(spec)
        names.append("reso")
    paths = {"data": root / spec.data_name}
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        paths[name] = root / name / "scores.parquet"
        method = "resonance" if name == "reso" else "ifd"
        data = {"format": spec.fmt, "fields": {}, "sharegpt_turns": spec.turns}
        cfg = {"method": method, "data": {"path": str(paths["data"]), **data}}
        (root / name / "run_config.json").write_text(json.dumps(cfg, indent=2))
    writers = {
        n: pq.ParquetWriter(paths[n], schemas["reso" if n == "reso" else "ifd"]) for n in names
    }
    jsonl = (
        {n: open(paths[n].with_suffix(".jsonl"), "w") for n in names} if spec.score_jsonl else {}
    )
    sentences = _sentences(spec.seed)
    array = spec.data_name.endswith(".json")
    t0 = time.perf_counter()
    with open(paths["data"], "w", encoding="utf-8") as data:
        data.write("[\n" if array else "")
        for start in range(0, spec.rows, spec.chunk_rows):
            plan = _plan(start, min(start + spec.chunk_rows, spec.rows), spec)
            lines = _data_lines(plan, spec, sentences) if spec.write_data else iter(())
            for j, line in enumerate(lines):
                if array:
                    data.write(",\n" + line if start or j else line)
                else:
                    data.write(line + "\n")
            for name, table in _score_tables(plan, spec, schemas).items():
                writers[name].write_table(table)
                if name in jsonl:
                    jsonl[name].writelines(
                        json.dumps({k: _json_value(v) for k, v in r.items()}, ensure_ascii=False)
                        + "\n"
                        for r in table.to_pylist()
                    )
            if log:
                done = min(start + spec.chunk_rows, spec.rows)
                print(f"{done} rows, {time.perf_counter() - t0:.1f} s", flush=True)
        data.write("\n]" if array else "")
    for w in writers.values():
        w.close()
    for f in jsonl.values():
        f.close()
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="alpaca", choices=["alpaca", "sharegpt"])
    p.add_argument("--turns", default="first", choices=["first", "all"])
    p.add_argument("--data", default="data.jsonl", help="data.jsonl or data.json (an array)")
    p.add_argument("--reso_params", type=int, default=3, help="0: no resonance file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk_rows", type=int, default=1 << 20)
    p.add_argument("--score_jsonl", action="store_true", help="also write scores.jsonl")
    a = p.parse_args()
    spec = PoolSpec(
        rows=a.rows,
        fmt=a.format,
        turns=a.turns,
        reso_params=a.reso_params,
        seed=a.seed,
        chunk_rows=a.chunk_rows,
        data_name=a.data,
        score_jsonl=a.score_jsonl,
    )
    t0 = time.perf_counter()
    paths = make_pool(a.out, spec, log=True)
    sizes = {k: f"{v.stat().st_size / 2**20:.0f} MiB" for k, v in paths.items()}
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "files": sizes}))


if __name__ == "__main__":
    main()
