"""Generators and an independent model of fuzzed data files for tests/test_fuzz_inputs.py.

A generated row is a Python value (a dict with random field faults, or a Parquet cell per
column) plus the records that reading it must give, computed here from the formats'
documented rules (formats.py, readers.py), not by calling them: ``expect_row`` for field
errors and ShareGPT pairs, ``Row.reader_error`` for rows a JSON reader cannot parse,
``BadCell`` for Parquet values without a Python form. Builders write the rows as JSONL
(BOM, blank lines, CRLF) or a JSON array (whitespace, BOM) and return the byte offsets the
truncation oracles need.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import pyarrow as pa
from hypothesis import strategies as st

from resofilter_jax.data.formats import to_records
from resofilter_jax.data.readers import iter_raw_rows
from resofilter_jax.data.records import DataError, ReadReport, Record
from resofilter_jax.data.sources import iter_records

BOM = b"\xef\xbb\xbf"
DEEP = 10_000  # nesting far beyond Python's recursion limit
TIME_LIMIT_S = 30.0  # per read; a hang fails the example
FORMATS = ("alpaca", "query_response", "gsm8k", "sharegpt")
FLAT = {  # format -> (canonical field, source key, required), as formats.py documents them
    "alpaca": (
        ("instruction", "instruction", True),
        ("input", "input", False),
        ("output", "output", True),
    ),
    "query_response": (("instruction", "query", True), ("output", "response", True)),
    "gsm8k": (("instruction", "question", True), ("output", "answer", True)),
}
ROLE_NAMES = {  # speaker code -> spellings: h(uman), g(pt), s(ystem), o(ther)
    "h": ("human", "Human", " user ", "USER"),
    "g": ("gpt", "GPT", "chatgpt", "assistant", "bard", "bing", "model"),
    "s": ("system", "System "),
    "o": ("tool", "", "humans", "gpt-4"),
}
ROLE_CODE = {"human": "h", "user": "h", "system": "s"} | dict.fromkeys(
    ("gpt", "chatgpt", "assistant", "bard", "bing", "model"), "g"
)
BAD_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf")
BAD_UTF8 += (b"\xf4\x90\x80\x80",)
# Each fails inside the element, so a JSON array reports it as that record's syntax error.
BAD_JSON = (b'{"instruction" "x"}', b'{"a": 1,}', b'{"a": tru}', b"{'a': 1}", b'{"a": [1, 2}')
BAD_JSON += (b'{"a": "x" "y"}', b'{"a": -}', b'{"a": 01}', b'{"a": .5}', b'{"a": "\\x"}')
BAD_JSON += (b"{,}", b"{", b"}", b"nul", b"\x00", b'{"a": "b\x00"}')
MISSING = object()


class ReadTimeout(Exception):
    """A read ran past ``TIME_LIMIT_S`` (a hang)."""


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    """Raises ReadTimeout in the block after ``seconds`` (SIGALRM; no-op where missing)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise ReadTimeout(f"read did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Expect:
    """What one record must hold; ``statuses`` are the allowed statuses."""

    statuses: frozenset[str]
    instruction: str = ""
    input: str = ""
    output: str = ""
    system: str = ""
    id: str | None = None
    turn: int = 0


def ok(**kw: Any) -> Expect:
    """A record with status ok and the given fields."""
    return Expect(frozenset({"ok"}), **kw)


def error(*reasons: str, id: str | None = None, system: str = "") -> Expect:
    """An error record whose status is ``error:<r>`` for any of ``reasons``."""
    return Expect(frozenset(f"error:{r}" for r in reasons), id=id, system=system)


ANY = Expect(frozenset())  # a record whose content is not predicted (a cut-off line)


def expected_id(value: Any) -> str | None:
    """Record.id of a row's id value: strings kept, ints as str, anything else None."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def expect_row(fmt: str, mode: str, row: dict[str, Any]) -> tuple[Expect, ...]:
    """The records a parsed row must give (field errors: any of the row's faults)."""
    rid = expected_id(row.get("id"))
    if fmt == "sharegpt":
        return expect_sharegpt(row.get("conversations", MISSING), mode, rid)
    errors, values = [], {}
    for canon, src, required in FLAT[fmt]:
        v = row.get(src, MISSING)
        if isinstance(v, str):
            values[canon] = v
        elif v is MISSING and required:
            errors.append(f"missing_field:{canon}")
        elif required or (v is not None and v is not MISSING):  # absent/null optional: ""
            errors.append(f"wrong_type:{canon}")
    return (error(*errors, id=rid),) if errors else (ok(id=rid, **values),)


def expect_sharegpt(conv: Any, mode: str, rid: str | None) -> tuple[Expect, ...]:
    """ShareGPT records: pairs counted as non-overlapping "hg" matches after the system run."""
    if conv is MISSING:
        return (error("missing_field:conversations", id=rid),)
    if not isinstance(conv, list):
        return (error("wrong_type:conversations", id=rid),)
    errors = set()
    for t in conv:
        if not isinstance(t, dict):
            errors.add("wrong_type:conversations")
            continue
        for key in ("from", "value"):
            if key not in t:
                errors.add(f"missing_field:{key}")
            elif not isinstance(t[key], str):
                errors.add(f"wrong_type:{key}")
    if errors:
        return (error(*errors, id=rid),)
    codes = "".join(ROLE_CODE.get(t["from"].strip().lower(), "o") for t in conv)
    m = len(codes) - len(codes.lstrip("s"))
    system = "\n".join(t["value"] for t in conv[:m])
    starts = [m + hit.start() for hit in re.finditer("hg", codes[m:])]
    if mode == "first":
        starts = starts[:1] if codes[m:].startswith("hg") else []
    if not starts:
        return (error("no_human_gpt_pair", id=rid, system=system),)
    return tuple(
        ok(instruction=conv[s]["value"], output=conv[s + 1]["value"], system=system, id=rid, turn=k)
        for k, s in enumerate(starts)
    )


def check_records(records: list[Record], rows: list[tuple[Expect, ...]], exact: bool = True):
    """``records`` are the records of ``rows`` in order (a prefix unless ``exact``)."""
    want = [(i, e) for i, recs in enumerate(rows) for e in recs]
    assert len(records) == len(want) if exact else len(records) <= len(want)
    for rec, (i, e) in zip(records, want, strict=False):
        assert rec.index == i, (rec, i)
        assert re.fullmatch(r"ok|error:[a-z0-9_]+(:[a-z_]+)?", rec.status), rec
        if e is ANY:
            continue
        assert rec.status in e.statuses, (i, rec, e)
        got = (rec.instruction, rec.input, rec.output, rec.system, rec.id, rec.turn)
        assert got == (e.instruction, e.input, e.output, e.system, e.id, e.turn), (i, rec, e)


def read(
    path: Path, fmt: str, mode: str = "first", *, chunk_size: int | None = None, **data: Any
) -> tuple[list[Record], DataError | None, ReadReport]:
    """Reads ``path`` through sources.iter_records (with a ``chunk_size``: through
    iter_raw_rows + to_records, as sources.py does) with the ``data`` section
    ``on_error="status"``, ``limit=0``, ``allow_truncated=False`` unless given; returns the
    records read before a DataError, the DataError (or None) and the read report."""
    data = {"on_error": "status", "limit": 0, "allow_truncated": False, **data}
    data |= {"reader": "auto", "split": "", "format": fmt, "sharegpt_turns": mode, "fields": {}}
    records: list[Record] = []
    report = ReadReport()
    with time_limit():
        try:
            if chunk_size is None:
                stream, report = iter_records(ml_collections.ConfigDict({"data": data}), str(path))
            else:
                opts = {"on_error": data["on_error"], "allow_truncated": data["allow_truncated"]}
                rows = iter_raw_rows(path, report=report, chunk_size=chunk_size, **opts)
                stream = to_records(rows, fmt, sharegpt_turns=mode, on_error=data["on_error"])
            records.extend(stream)
        except DataError as e:
            return records, e, report
    return records, None, report


# ------------------------------------------------------------------------ JSON rows

JSON_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=8),  # lone surrogates included
    st.sampled_from(["", "\x00", "a\x00b", "\u2028", "\ufeff", "\ud800", "\udfff x", "😀", '\\"']),
)
PQ_TEXT = st.one_of(st.text(max_size=8), st.sampled_from(["", "\x00", "a\x00b", "\ufeff", "😀"]))


def nested(depth: int) -> list[Any]:
    """A list nested ``depth`` deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


NOT_STR = st.one_of(  # numbers (NaN, Infinity too), bools, lists, objects, 2-100 deep lists
    st.integers(-(10**30), 10**30),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.none(), max_size=2),
    st.integers(2, 100).map(nested),
)
NOT_OBJECT = st.one_of(NOT_STR, JSON_TEXT, st.none()).map(
    lambda v: [] if isinstance(v, dict) else v
)
IDS = st.one_of(st.just(MISSING), JSON_TEXT, st.integers(-(10**30), 10**30), NOT_STR, st.none())


def field_value(draw: Callable, text: st.SearchStrategy[str]) -> Any:
    """A field value: mostly text; sometimes "", absent (MISSING), null or not a string."""
    kind = draw(st.sampled_from(("text",) * 8 + ("empty", "missing", "null", "wrong")))
    if kind == "text":
        return draw(text)
    return draw(NOT_STR) if kind == "wrong" else {"empty": "", "missing": MISSING}.get(kind)


def turn_value(draw: Callable, k: int, text: st.SearchStrategy[str]) -> Any:
    """Turn ``k``: mostly alternating human/gpt speakers, sometimes not a dict, a missing
    key or a non-string field."""
    code = draw(st.sampled_from(("hg"[k % 2],) * 8 + ("h", "g", "s", "o")))
    turn = {"from": draw(st.sampled_from(ROLE_NAMES[code])), "value": draw(text)}
    fault = draw(st.sampled_from(("ok",) * 36 + ("not_dict", "no_key", "bad_from", "bad_value")))
    if fault == "not_dict":
        return draw(st.one_of(text, NOT_STR, st.none()))
    if fault == "no_key":
        del turn[draw(st.sampled_from(("from", "value")))]
    elif fault != "ok":
        turn[fault[4:]] = draw(st.one_of(NOT_STR, st.none()))
    return turn


def row_dict(draw: Callable, fmt: str, text: st.SearchStrategy[str] = JSON_TEXT) -> dict:
    """A row of ``fmt`` with random field faults (JSON readers)."""
    obj: dict[str, Any] = {}
    if fmt == "sharegpt":
        kind = draw(st.sampled_from(("list",) * 10 + ("missing", "wrong")))
        if kind == "wrong":
            obj["conversations"] = draw(st.one_of(text, NOT_STR, st.none()))
        elif kind == "list":
            system = [{"from": "system", "value": draw(text)}] * draw(st.sampled_from((0, 0, 1, 2)))
            n = draw(st.integers(0, 6))
            obj["conversations"] = system + [turn_value(draw, k, text) for k in range(n)]
    else:
        for _, src, _ in FLAT[fmt]:
            if (v := field_value(draw, text)) is not MISSING:
                obj[src] = v
    if (rid := draw(IDS)) is not MISSING:
        obj["id"] = rid
    return obj


@dataclass(frozen=True)
class Row:
    """One JSON row: its text (array element or JSONL line) and what reading it gives."""

    text: bytes
    records: tuple[Expect, ...]  # when the text parses
    reader_error: str = ""  # a JSONL row error; bad_json/invalid_utf8 are fatal in an array
    bom: bool = False  # text starts with a BOM (parses on JSONL line 1)

    def expect(self, line1: bool = False) -> tuple[Expect, ...]:
        """The records of this row (``line1``: on JSONL line 1, where a BOM is stripped)."""
        if self.reader_error and not (line1 and self.bom):
            return (error(self.reader_error),)
        return self.records


def dumps(value: Any, ascii_only: bool) -> bytes:
    """JSON as UTF-8 bytes (escaped where the value holds a lone surrogate)."""
    try:
        return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only its \\u escape is valid UTF-8
        return json.dumps(value).encode("utf-8")


SAFE = ("plain",) * 12 + ("dup", "not_object", "number")
FATAL = ("bad_json", "invalid_utf8", "raw_nul", "deep", "bigint", "bom")


def json_row(draw: Callable, fmt: str, mode: str, encodings: tuple[str, ...] = SAFE) -> Row:
    """A row dict written as JSON, possibly broken in one of ``encodings``' ways."""
    obj = row_dict(draw, fmt)
    records = expect_row(fmt, mode, obj)
    body = dumps(obj, draw(st.booleans()))
    how = draw(st.sampled_from(encodings))

    def first_member(value: bytes) -> bytes:  # "x": value, then the row's own members
        return b'{"x": ' + value + (b", " if obj else b"") + body[1:]

    if how == "dup" and obj:  # an earlier duplicate of a key: the last one wins
        key = dumps(draw(st.sampled_from(sorted(obj))), True)
        return Row(b"{" + key + b": " + dumps(draw(NOT_STR), True) + b", " + body[1:], records)
    if how in ("not_object", "number"):  # "number": a fraction or exponent, "1.5", "2e-07"
        finite = st.floats(allow_nan=False, allow_infinity=False)
        value = draw(NOT_OBJECT if how == "not_object" else finite)
        return Row(dumps(value, True), records, "not_an_object")
    if how == "bad_json":
        return Row(draw(st.sampled_from(BAD_JSON)), records, "bad_json")
    if how == "bom":
        return Row(BOM + body, records, "bad_json", bom=True)
    if how == "invalid_utf8":
        bad = b'"a' + draw(st.sampled_from(BAD_UTF8)) + b'"'
        return Row(first_member(bad), records, "invalid_utf8")
    members = {"raw_nul": b'"a\x00b"', "deep": b"[" * DEEP + b"]" * DEEP, "bigint": b"9" * 5000}
    if how in members:
        return Row(first_member(members[how]), records, "bad_json")
    return Row(body, records)


# ------------------------------------------------------------------------ files


@dataclass(frozen=True)
class Placed:
    """A row in a JSONL file: where its text lies and whether it is on line 1 (no file BOM)."""

    row: Row
    start: int
    end: int
    lineno: int
    line1: bool

    def expect(self) -> tuple[Expect, ...]:
        """The records this line gives."""
        return self.row.expect(self.line1)


def build_jsonl(draw: Callable, rows: list[Row]) -> tuple[bytes, list[Placed]]:
    """JSONL with an optional BOM, blank lines, LF or CRLF, maybe no final newline."""
    file_bom = draw(st.booleans())
    eol = draw(st.sampled_from((b"\n", b"\r\n")))
    blanks = st.lists(st.sampled_from((b"", b" ", b"\t", b"\r", b" \t\r")), max_size=1)
    out = bytearray(BOM if file_bom else b"")
    placed: list[Placed] = []
    lineno = 1
    for k, row in enumerate(rows):
        for blank in draw(blanks) if k % 4 == 0 else ():
            out += blank + b"\n"
            lineno += 1
        placed.append(
            Placed(row, len(out), len(out) + len(row.text), lineno, lineno == 1 and not file_bom)
        )
        out += row.text
        if k + 1 < len(rows) or draw(st.booleans()):
            out += eol
            lineno += 1
    return bytes(out), placed


def build_array(draw: Callable, rows: list[Row]) -> tuple[bytes, list[tuple[int, int]], int, int]:
    """A JSON array: (data, element byte spans, offset of '[', offset of ']')."""
    ws = st.sampled_from((b"", b" ", b"\n", b"\r\n  ", b"\t"))
    out = bytearray((BOM if draw(st.booleans()) else b"") + draw(ws))
    open_at = len(out)
    out += b"["
    spans = []
    for k, row in enumerate(rows):
        out += (b"," if k else b"") + draw(ws)
        spans.append((len(out), len(out) + len(row.text)))
        out += row.text
    close_at = len(out)
    out += b"]" + draw(ws)
    return bytes(out), spans, open_at, close_at


def json_rows(
    draw: Callable, fmt: str, mode: str, n: tuple[int, int], enc: tuple[str, ...]
) -> list[Row]:
    """Between ``n[0]`` and ``n[1]`` rows, each written in one of the ``enc`` ways."""
    return [json_row(draw, fmt, mode, enc) for _ in range(draw(st.integers(*n)))]


# ------------------------------------------------------------------------ Parquet


@dataclass(frozen=True)
class BadCell:
    """A Parquet value with no Python form: the reader must make its row a row error."""

    reason: str


OTHER = object()  # a non-string value whose exact Python form does not matter (a datetime)
PA_TYPES = {
    "string": pa.string(), "large_string": pa.large_string(), "int64": pa.int64(),
    "float64": pa.float64(), "bool": pa.bool_(), "binary": pa.binary(),
    "list_string": pa.list_(pa.string()), "struct": pa.struct([("a", pa.int64())]),
    "null": pa.null(), "timestamp": pa.timestamp("s"),
    "turns": pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])),
}  # fmt: skip
PQ_KINDS = ("string",) * 14 + ("large_string", "dict_string", "absent", "bad_utf8", "timestamp")
PQ_KINDS += ("int64", "float64", "bool", "binary", "list_string", "struct", "null")
EXTRA = tuple(kind for kind in PQ_KINDS if kind != "absent")
CONV_KINDS = ("turns",) * 8 + ("absent", "string", "int64", "list_string", "null")
ID_KINDS = ("absent", "string", "int64", "float64", "bool", "null", "bad_utf8", "timestamp")
PQ_VALUES = {
    "int64": st.integers(-(2**63), 2**63 - 1), "float64": st.floats(), "bool": st.booleans(),
    "binary": st.binary(max_size=4), "list_string": st.lists(PQ_TEXT, max_size=2),
    "struct": st.fixed_dictionaries({"a": st.integers(0, 9)}),
    "bad_utf8": st.one_of(PQ_TEXT.map(str.encode), st.sampled_from(BAD_UTF8).map(b"a".__add__)),
    "timestamp": st.one_of(st.integers(0, 2 * 10**9), st.integers(10**12, 10**15)),
}  # fmt: skip


PA_KEYS = ("from", "value")


def pq_turns(draw: Callable) -> list[Any]:
    """A ShareGPT conversation as a Parquet list of structs (missing/wrong fields: nulls)."""
    turns: list[Any] = []
    for k in range(draw(st.integers(0, 5))):
        turn = turn_value(draw, k, PQ_TEXT)
        if not isinstance(turn, dict):
            turn = None  # a null struct element
        else:  # a struct has both fields; a missing or wrong one is a null
            turn = {key: v if isinstance(v := turn.get(key), str) else None for key in PA_KEYS}
        turns.append(turn)
    return turns


def pq_cell(draw: Callable, kind: str) -> tuple[Any, Any]:
    """(value written, value the reader gives) for one cell of a column of ``kind``."""
    if kind == "null" or draw(st.integers(0, 9)) == 0:
        return None, None
    if kind == "turns":
        value = pq_turns(draw)
        return value, value
    if kind in ("string", "large_string", "dict_string"):
        value = draw(PQ_TEXT)
        return value, value
    value = draw(PQ_VALUES[kind])
    if kind == "bad_utf8":
        try:
            return value, value.decode("utf-8")
        except UnicodeDecodeError:
            return value, BadCell("invalid_utf8")
    if kind == "timestamp":
        return value, OTHER if value <= 2 * 10**9 else BadCell("bad_value")
    return value, value


def pa_column(kind: str, values: list[Any]) -> pa.Array:
    if kind == "dict_string":
        return pa.array(values, pa.string()).dictionary_encode()
    if kind != "bad_utf8":
        return pa.array(values, PA_TYPES[kind])
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v or b""))
    buffers = [
        pa.array([v is not None for v in values], pa.bool_()).buffers()[1],
        pa.array(offsets, pa.int32()).buffers()[1],
        pa.py_buffer(b"".join(v or b"" for v in values)),
    ]  # a string array built from raw bytes: pyarrow does not validate the UTF-8
    return pa.Array.from_buffers(pa.string(), len(values), buffers, null_count=values.count(None))


def parquet_table(
    draw: Callable, fmt: str, mode: str, n: int
) -> tuple[pa.Table, list[tuple[Expect, ...]]]:
    """``n`` rows with random column types, nulls, a missing or duplicate column and bad
    cells; and the records each row must give."""
    if fmt == "sharegpt":
        columns = [("conversations", draw(st.sampled_from(CONV_KINDS)))]
    else:
        columns = [(src, draw(st.sampled_from(PQ_KINDS))) for _, src, _ in FLAT[fmt]]
    columns += [("id", draw(st.sampled_from(ID_KINDS))), ("extra", draw(st.sampled_from(EXTRA)))]
    if draw(st.booleans()):  # a duplicate column name: the last column wins
        name = draw(st.sampled_from([c for c, _ in columns]))
        columns.append((name, draw(st.sampled_from(PQ_KINDS))))
    columns = [(c, kind) for c, kind in columns if kind != "absent"]
    cells = [[pq_cell(draw, kind) for _ in range(n)] for _, kind in columns]
    arrays = [pa_column(k, [w for w, _ in col]) for (_, k), col in zip(columns, cells, strict=True)]
    expected = []
    for i in range(n):
        row = {c: col[i][1] for (c, _), col in zip(columns, cells, strict=True)}
        bad = [col[i][1].reason for col in cells if isinstance(col[i][1], BadCell)]
        expected.append((error(*bad),) if bad else expect_row(fmt, mode, row))
    return pa.Table.from_arrays(arrays, names=[c for c, _ in columns]), expected
