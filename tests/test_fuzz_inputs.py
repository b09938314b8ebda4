"""Property-based tests of the data readers and formats on fuzzed input (hypothesis).

Every generated file is read through the public path (``sources.iter_records`` with a small
ml_collections config; ``iter_raw_rows`` + ``to_records`` as sources.py does where a small
JSON chunk size is drawn) with ``on_error="status"`` and must give exactly the records an
independent model of the input predicts: one per input row (ShareGPT "all" turns: one per
human->gpt pair, counted with a regex over the speaker codes), in order, each with a status
``ok`` or ``error:<reason>``; or, where the input cannot be read on (a JSON array syntax
error or invalid UTF-8, a cut-off file, a broken Parquet file), exactly the predicted prefix
followed by one DataError naming the file and the record or byte. No other exception may
escape, and every read runs under a SIGALRM time limit (a hang fails the test).

Readers x formats: JSON array, JSONL, Parquet x Alpaca, query/response, GSM8K, ShareGPT
("first" and "all" turns). Fault kinds: invalid UTF-8 (8 byte patterns), raw and escaped
NUL, escaped lone surrogates, empty fields and conversations, wrong types (int, float incl.
NaN/Infinity, bool, null, lists, objects, 100-deep lists; Parquet int/float/bool/binary/
list/struct/timestamp/null/dictionary columns), 10,000-deep lists, 5,000-digit integers,
duplicate keys (and duplicate Parquet columns), blank lines, CRLF, BOMs (file start and
stray), syntax errors, non-object rows, missing fields and columns, truncation at random
byte offsets, empty and garbage files, 1 MB fields, ``data.limit``, ``on_error="raise"``.

Rows per run (``derandomize=True``, ``database=None``: every run draws the same examples;
no strategy filters, so each test runs its ``max_examples``; test_row_budget checks the
total at run time). Generators and the model live in tests/support/fuzz.py.

    test_jsonl_status ........ 50 examples x >= 45 rows = 2,250
    test_json_array_status ... 50 examples x >= 45 rows = 2,250
    test_parquet_status ...... 50 examples x >= 45 rows = 2,250
    test_truncated_json ...... 40 examples x >= 30 rows = 1,200
    test_truncated_jsonl ..... 40 examples x >= 30 rows = 1,200
    test_raise_mode .......... 40 examples x >= 30 rows = 1,200
    test_huge_fields ......... 3 readers x 2 examples x 3 rows = 18
    total .................... >= 10,368 rows (about 11,600 in practice)

Shrinking is off (a ~50-row example can take minutes to shrink); FUZZ_SHRINK=1 turns it on.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support.fuzz import (
    ANY,
    BOM,
    DEEP,
    FATAL,
    FLAT,
    FORMATS,
    SAFE,
    Expect,
    build_array,
    build_jsonl,
    check_records,
    dumps,
    expect_row,
    json_row,
    json_rows,
    pa_column,
    parquet_table,
    read,
    time_limit,
)

from resofilter_jax.data.formats import load_records
from resofilter_jax.data.readers import iter_raw_rows
from resofilter_jax.data.records import DataError, ReadReport, TruncatedInputError

ROWS_SEEN: Counter[str] = Counter()  # generated rows read per property test (row budget)
ROW_BUDGET = 10_000
READER_ERRORS = frozenset({"error:bad_json", "error:invalid_utf8", "error:not_an_object"})
PQ_ERRORS = frozenset({"error:invalid_utf8", "error:bad_value"})
PHASES = tuple(Phase) if os.environ.get("FUZZ_SHRINK") == "1" else (Phase.explicit, Phase.generate)
FMT = st.sampled_from(FORMATS)
MODE = st.sampled_from(("first", "all"))


def fuzz(examples: int, deadline_s: float = 10.0) -> settings:
    """Reproducible settings: fixed example sequence, no example database, a deadline."""
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=deadline_s),
        derandomize=True,
        database=None,
        phases=PHASES,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


# ------------------------------------------------------------------------ properties


@fuzz(50)
@given(data=st.data(), fmt=FMT, mode=MODE)
def test_jsonl_status(tmp_path: Path, data: st.DataObject, fmt: str, mode: str) -> None:
    """Every non-blank line gives its records; line faults are error rows, never raised."""
    rows = json_rows(data.draw, fmt, mode, (45, 55), SAFE + FATAL)
    content, placed = build_jsonl(data.draw, rows)
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    limit = data.draw(st.sampled_from((0, 0, 0, 7)))
    records, err, report = read(path, fmt, mode, limit=limit)
    assert err is None
    placed = placed[: limit or None]
    check_records(records, [p.expect() for p in placed])
    assert report.rows_read == len(placed)
    assert report.errors == sum(p.expect()[0].statuses <= READER_ERRORS for p in placed)
    ROWS_SEEN["jsonl"] += len(rows)


@fuzz(50)
@given(data=st.data(), fmt=FMT, mode=MODE)
def test_json_array_status(tmp_path: Path, data: st.DataObject, fmt: str, mode: str) -> None:
    """All records, or the records before the first unreadable element and one DataError
    naming the file and that record (or the first invalid UTF-8 byte)."""
    draw = data.draw
    rows = json_rows(draw, fmt, mode, (45, 55), SAFE)
    for _ in range(draw(st.sampled_from((0, 0, 1, 2)))):
        rows[draw(st.integers(0, len(rows) - 1))] = json_row(draw, fmt, mode, FATAL)
    content, _, _, _ = build_array(draw, rows)
    path = tmp_path / "d.json"
    path.write_bytes(content)
    records, err, _ = read(
        path, fmt, mode, chunk_size=draw(st.sampled_from((None, 1, 2, 3, 5, 64)))
    )
    expected = [r.expect() for r in rows]
    fatal = [i for i, r in enumerate(rows) if r.reader_error in ("bad_json", "invalid_utf8")]
    if not fatal:
        assert err is None
        check_records(records, expected)
    else:
        assert err is not None and str(path) in str(err), err
        first = fatal[0]
        messages = []
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as e:
            messages.append(f"invalid UTF-8 at byte {e.start} (")
        if rows[first].reader_error == "bad_json":
            messages.append(f"record {first} (0-based) at byte")
        assert any(m in str(err) for m in messages), (str(err), messages)
        # Elements are decoded in order, so a syntax error comes after all earlier records.
        check_records(records, expected[:first], exact=f"record {first} (0-based)" in str(err))
    ROWS_SEEN["json"] += len(rows)


@fuzz(40)
@given(data=st.data(), fmt=FMT, mode=MODE)
def test_truncated_json(tmp_path: Path, data: st.DataObject, fmt: str, mode: str) -> None:
    """A JSON array cut at a random byte gives the records of the complete elements, then
    TruncatedInputError (or nothing more with allow_truncated); before '[': a DataError."""
    draw = data.draw
    rows = json_rows(draw, fmt, mode, (30, 40), SAFE)
    content, spans, open_at, close_at = build_array(draw, rows)
    cut = draw(st.integers(0, len(content) - 1))
    allow = draw(st.booleans())
    path = tmp_path / "cut.json"
    path.write_bytes(content[:cut])
    chunk = draw(st.sampled_from((None, 1, 5, 64)))
    records, err, report = read(path, fmt, mode, allow_truncated=allow, chunk_size=chunk)
    expected = [r.expect() for r in rows]
    ROWS_SEEN["truncated_json"] += len(rows)
    if cut > close_at:  # only trailing whitespace was cut
        assert err is None
        return check_records(records, expected)
    if cut <= open_at:
        assert isinstance(err, DataError) and not isinstance(err, TruncatedInputError), err
        assert str(path) in str(err) and records == []
        return None
    # A number or literal is complete only once a character that cannot continue it follows.
    k = sum(
        end + (row.text[:1] not in b'{["') <= cut for (_, end), row in zip(spans, rows, strict=True)
    )
    check_records(records, expected[:k])
    offset = spans[k - 1][1] if k else open_at + 1
    if allow:
        assert err is None and report.truncated and report.bytes_unparsed == cut - offset
    else:
        assert isinstance(err, TruncatedInputError), err
        assert err.records == k and err.offset == offset and str(path) in str(err)
        assert f"after byte {offset} of {cut}" in str(err)
    return None


@fuzz(40)
@given(data=st.data(), fmt=FMT, mode=MODE)
def test_truncated_jsonl(tmp_path: Path, data: st.DataObject, fmt: str, mode: str) -> None:
    """JSONL cut at a random byte: every complete line keeps its records, a non-blank cut
    line gives exactly one record (its own if only the line end was cut)."""
    draw = data.draw
    rows = json_rows(draw, fmt, mode, (30, 40), SAFE + FATAL)
    content, placed = build_jsonl(draw, rows)
    cut = draw(st.integers(0, len(content)))
    path = tmp_path / "cut.jsonl"
    path.write_bytes(content[:cut])
    records, err, _ = read(path, fmt, mode)
    assert err is None
    complete = [p for p in placed if 0 <= content.find(b"\n", p.end) < cut]
    expected = [p.expect() for p in complete]
    start = content.rfind(b"\n", 0, cut) + 1
    seg = content[start:cut]
    if start == 0 and seg.startswith(BOM):
        seg = seg[len(BOM) :]
    if seg.strip():
        p = placed[len(complete)]
        whole = content[p.start : cut] in (p.row.text, p.row.text + b"\r")
        expected.append(p.expect() if whole else (ANY,))
    check_records(records, expected)
    ROWS_SEEN["truncated_jsonl"] += len(rows)


def raises_row(recs: tuple[Expect, ...]) -> bool:
    """Whether a row must raise with on_error='raise' (no_human_gpt_pair never does)."""
    return any(e.statuses - {"ok", "error:no_human_gpt_pair"} for e in recs)


@fuzz(40)
@given(data=st.data(), fmt=FMT, mode=MODE, reader=st.sampled_from(("json", "jsonl")))
def test_raise_mode(tmp_path: Path, data: st.DataObject, fmt: str, mode: str, reader: str):
    """on_error='raise': the records before the first bad row, then one DataError naming the
    file and line/record (reader errors) or the row (field errors); load_records always
    names the file."""
    draw = data.draw
    rows = json_rows(draw, fmt, mode, (30, 40), SAFE + (FATAL if reader == "jsonl" else ()))
    if reader == "jsonl":
        content, placed = build_jsonl(draw, rows)
        expected = [p.expect() for p in placed]
    else:
        content = build_array(draw, rows)[0]
        expected = [r.expect() for r in rows]
    path = tmp_path / f"d.{reader}"
    path.write_bytes(content)
    records, err, _ = read(path, fmt, mode, on_error="raise")
    ROWS_SEEN["raise"] += len(rows)
    bad = next((i for i, recs in enumerate(expected) if raises_row(recs)), None)
    if bad is None:
        assert err is None
        return check_records(records, expected)
    assert err is not None
    check_records(records, expected[:bad])
    if expected[bad][0].statuses <= READER_ERRORS:
        where = f"line {placed[bad].lineno}:" if reader == "jsonl" else f"record {bad}:"
        assert str(path) in str(err) and where in str(err), err
    else:  # a format error: sources.iter_records puts the path in front
        assert str(path) in str(err) and f"row {bad}:" in str(err), err
    with time_limit(), pytest.raises(DataError, match=re.escape(str(path))):
        load_records(path, fmt, sharegpt_turns=mode, on_error="raise")  # type: ignore[arg-type]
    return None


@fuzz(50)
@given(data=st.data(), fmt=FMT, mode=MODE)
def test_parquet_status(tmp_path: Path, data: st.DataObject, fmt: str, mode: str) -> None:
    """Typed columns, nulls, missing and duplicate columns, invalid UTF-8 and out-of-range
    timestamps, several row groups: one record per row, bad cells make row errors."""
    n = data.draw(st.integers(45, 55))
    table, expected = parquet_table(data.draw, fmt, mode, n)
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=data.draw(st.integers(1, n)))
    records, err, report = read(path, fmt, mode)
    assert err is None
    check_records(records, expected)
    assert report.errors == sum(bool(e[0].statuses & PQ_ERRORS) for e in expected)
    ROWS_SEEN["parquet"] += n


@fuzz(30)
@given(data=st.data(), how=st.sampled_from(("cut", "cut", "garbage", "json")))
def test_broken_parquet(tmp_path: Path, data: st.DataObject, how: str) -> None:
    """A cut-off, empty or non-Parquet file is one DataError naming the file, no records."""
    table = pa.table({"instruction": ["a", "b"] * 20, "output": ["c", "d"] * 20})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    content = path.read_bytes()
    if how == "cut":
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    elif how == "garbage":
        content = data.draw(st.binary(max_size=64))
    else:
        content = b'[{"instruction": "a", "output": "b"}]'
    path.write_bytes(content)
    records, err, _ = read(path, "alpaca")
    assert isinstance(err, DataError) and str(path) in str(err) and records == []


@pytest.mark.parametrize("reader", ["json", "jsonl", "parquet"])
@fuzz(2, deadline_s=60)
@given(data=st.data(), fmt=FMT)
def test_huge_fields(tmp_path: Path, reader: str, data: st.DataObject, fmt: str) -> None:
    """A 1 MB field (ASCII, 2- or 4-byte UTF-8, NUL, backslash) reads back unchanged."""
    big = data.draw(st.sampled_from(("a", "é", "😀", "\x00", "\\"))) * (1 << 20)
    # Field k of the 3 rows (2 or 3 fields each) is 1 MB when k is in `huge`, else "x" or "".
    huge = {data.draw(st.integers(0, 5)), 6}
    texts = [big if k in huge else "x" * (k % 2) for k in range(9)]
    if fmt == "sharegpt":
        pairs = [(texts[0], texts[1]), (texts[2], texts[3]), (texts[4], texts[6])]
        rows = [
            {"conversations": [{"from": "human", "value": h}, {"from": "gpt", "value": g}]}
            for h, g in pairs
        ]
    else:
        srcs = [src for _, src, _ in FLAT[fmt]]
        rows = [{src: texts[3 * k + j] for j, src in enumerate(srcs)} for k in range(3)]
    path = tmp_path / f"d.{reader}"
    if reader == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif reader == "jsonl":
        path.write_bytes(b"\n".join(dumps(r, False) for r in rows))
    else:
        path.write_bytes(b"[" + b",".join(dumps(r, False) for r in rows) + b"]")
    chunk = data.draw(st.sampled_from((None, 1 << 16))) if reader == "json" else None
    records, err, _ = read(path, fmt, "all", chunk_size=chunk)
    assert err is None
    check_records(records, [expect_row(fmt, "all", r) for r in rows])
    ROWS_SEEN["huge"] += len(rows)


# ------------------------------------------------------------------------ regressions


def reasons(path: Path, **kw: object) -> list[object]:
    """The rows of ``path`` read with on_error='status': dicts, or RowError reasons."""
    rows = iter_raw_rows(path, on_error="status", **kw)  # type: ignore[arg-type]
    return [row if isinstance(row, dict) else row.reason for _, row in rows]


def test_jsonl_deeply_nested_line_is_a_bad_json_row(tmp_path: Path) -> None:
    """Was: RecursionError from json.loads escaped the JSONL reader."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"[" * DEEP + b"]" * DEEP + b'\n{"a": 1}\n')
    assert reasons(path) == ["bad_json", {"a": 1}]
    with pytest.raises(DataError, match=r"d\.jsonl: line 1: nested too deeply"):
        list(iter_raw_rows(path))


def test_jsonl_overlong_integer_is_a_bad_json_row(tmp_path: Path) -> None:
    """Was: ValueError (sys.get_int_max_str_digits) escaped the JSONL reader."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": ' + b"9" * 5000 + b'}\n{"a": 1}\n')
    assert reasons(path) == ["bad_json", {"a": 1}]


def test_json_array_deeply_nested_element_is_a_data_error(tmp_path: Path) -> None:
    """Was: RecursionError from the array decoder."""
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"a": 1}, ' + b"[" * DEEP + b"]" * DEEP + b"]")
    with pytest.raises(DataError, match=r"d\.json: cannot decode record 1 \(0-based\) at byte 11"):
        list(iter_raw_rows(path, on_error="status"))


def test_json_array_overlong_integer_is_a_data_error(tmp_path: Path) -> None:
    """Was: ValueError (sys.get_int_max_str_digits) escaped the array decoder."""
    path = tmp_path / "d.json"
    path.write_bytes(b"[" + b"9" * 5000 + b"]")
    with pytest.raises(DataError, match=r"d\.json: cannot decode record 0 .*4300 digits"):
        list(iter_raw_rows(path, on_error="status"))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 8])
def test_json_array_number_split_across_chunks(tmp_path: Path, chunk_size: int) -> None:
    """Was: a top-level number cut by a chunk boundary after '.' or 'e' was read as its
    integer part, then the rest was a syntax error."""
    path = tmp_path / "d.json"
    path.write_bytes(b'[1.5, 2e5, {"a": 1}]')
    assert reasons(path, chunk_size=chunk_size) == ["not_an_object"] * 2 + [{"a": 1}]


@pytest.mark.parametrize("chunk_size", [1, 4 << 20])
def test_json_array_cut_inside_a_top_level_number_is_a_truncation(
    tmp_path: Path, chunk_size: int
) -> None:
    """Was: '[1.' (a file cut inside 1.5) was a syntax error, not a cut-off file."""
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"a": 1}, 1.')
    report = ReadReport()
    rows = iter_raw_rows(path, allow_truncated=True, report=report, chunk_size=chunk_size)
    assert [row for _, row in rows] == [{"a": 1}]
    assert report.truncated and report.bytes_unparsed == 4


def test_parquet_invalid_utf8_and_out_of_range_values_are_row_errors(tmp_path: Path) -> None:
    """Was: UnicodeDecodeError / OverflowError from pyarrow's to_pylist escaped the reader."""
    strings = pa_column("bad_utf8", [b"ok", b"a\xff", None])
    stamps = pa.array([0, 0, 10**15], pa.timestamp("s"))
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": strings, "t": stamps}), path)
    rows = reasons(path)
    assert rows[0] == {"instruction": "ok", "t": rows[0]["t"]}  # type: ignore[index]
    assert rows[1:] == ["invalid_utf8", "bad_value"]
    with pytest.raises(DataError, match=r"d\.parquet: row 1: column 'instruction': invalid UTF-8"):
        list(iter_raw_rows(path))


def test_iter_records_field_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a"}\n')
    _, err, _ = read(path, "alpaca", on_error="raise")
    assert err is not None and str(path) in str(err)


def test_row_budget() -> None:
    """The property tests above read at least ROW_BUDGET generated rows (full-module runs)."""
    expected = {"jsonl", "json", "parquet", "truncated_json", "truncated_jsonl", "raise", "huge"}
    if set(ROWS_SEEN) != expected:
        pytest.skip(f"only {sorted(ROWS_SEEN)} of the property tests ran")
    assert sum(ROWS_SEEN.values()) >= ROW_BUDGET, ROWS_SEEN
