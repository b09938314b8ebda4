"""Selected rows written incrementally: a ``.json`` array or JSONL, the bytes ``json.dump`` writes.

:func:`write_outputs` writes one or several output files from one pass over a stream of rows
(the rows of a data file come in input order): a file whose order follows the stream is
written as the rows arrive; any other file gets its rows from a spill file of encoded rows,
read back in that file's order. Each file appears atomically (``name.tmp`` then
``os.replace``), or not at all when the stream fails.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["RowsFile", "encode_row", "write_outputs", "write_rows"]


# The encoders json.dumps(row, ensure_ascii=False[, indent=1]) builds on every call.
_JSONL = json.JSONEncoder(ensure_ascii=False)
_ARRAY = json.JSONEncoder(ensure_ascii=False, indent=1)
_BUFFER = 1 << 20  # bytes of write buffer per file


def encode_row(row: Mapping[str, Any], array: bool) -> bytes:
    """One row as it appears in a JSON array written with ``indent=1`` (``array``) or in JSONL.

    In the array every line of an element is indented by one more space than the element
    alone; a JSON string holds no raw newline, so each ``\\n`` is a line break of the layout.
    """
    if array:
        return _ARRAY.encode(row).replace("\n", "\n ").encode()
    return (_JSONL.encode(row) + "\n").encode()


class RowsFile:
    """An output file written row by row: ``.json`` -> one JSON array (``indent=1``), else JSONL.

    The text equals ``json.dump(rows, f, ensure_ascii=False, indent=1)`` (array) or one
    ``json.dumps(row, ensure_ascii=False)`` line per row.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.array = self.path.suffix == ".json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f: BinaryIO = open(self._tmp, "wb", buffering=_BUFFER)  # noqa: SIM115
        self.rows = 0

    def write(self, encoded: bytes) -> None:
        """Appends one row encoded by :func:`encode_row` (with this file's ``array``)."""
        if self.array:
            self._f.write(b",\n " if self.rows else b"[\n ")
        self._f.write(encoded)
        self.rows += 1

    def close(self) -> Path:
        """Finishes the file and moves it into place."""
        if self.array:
            self._f.write(b"\n]" if self.rows else b"[]")
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Removes the unfinished file."""
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def write_rows(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Writes ``rows`` atomically: ``.json`` -> one JSON array, anything else -> JSONL."""
    out = RowsFile(path)
    try:
        for row in rows:
            out.write(encode_row(row, out.array))
    except BaseException:
        out.abort()
        raise
    return out.close()


def write_outputs(
    outputs: Sequence[tuple[str | os.PathLike[str], np.ndarray]],
    make: Callable[[np.ndarray], Iterable[Mapping[str, Any]]],
    stream: np.ndarray | None = None,
) -> list[Path]:
    """Writes each ``(path, positions)`` output: the rows ``make`` gives for them, in that order.

    Args:
        outputs: Files and the row positions each holds, in file order.
        make: ``make(positions)`` yields the row of each position in that order.
        stream: None when ``make`` accepts any order (one call per file). Otherwise the one
            order ``make`` can produce (unique positions covering every output): it is called
            once, and files whose order is not a subsequence of it are filled from a spill file.
    """
    if stream is None:
        return [write_rows(path, make(np.asarray(pos))) for path, pos in outputs]
    stream = np.asarray(stream, np.int64)
    ascending = len(stream) < 2 or bool(np.all(stream[1:] > stream[:-1]))
    by_pos = None if ascending else np.argsort(stream, kind="stable")  # stream[by_pos] ascends
    slots = []  # per output: [rows] the stream slot of each of its rows
    for _, pos in outputs:
        slot = np.searchsorted(stream, pos, sorter=by_pos)
        np.minimum(slot, max(len(stream) - 1, 0), out=slot)
        slot = slot if by_pos is None else by_pos[slot]
        if len(pos) and not np.array_equal(stream[slot], pos):
            raise ValueError("every output position must be in the stream")
        slots.append(slot)
    direct = [len(s) < 2 or bool(np.all(np.diff(s) > 0)) for s in slots]
    member = []  # per output written as the stream goes: bytes, 1 where a stream row goes
    spilled = np.zeros(len(stream), np.uint8)  # 1 where a row is read back for another file
    for s, is_direct in zip(slots, direct, strict=True):
        mask = np.zeros(len(stream), np.uint8)
        mask[s] = 1
        member.append(mask.tobytes() if is_direct else None)
        if not is_direct:
            spilled[s] = 1
    files = [RowsFile(path) for path, _ in outputs]
    layouts = sorted({f.array for f in files})
    spill = None if all(direct) else _Spill(files[0].path.parent, len(stream), layouts)
    need = spilled.tobytes()
    del spilled
    routes = [(f, m) for f, m in zip(files, member, strict=True) if m is not None]
    try:
        for slot, row in enumerate(make(stream)):
            texts = [encode_row(row, a) for a in layouts]
            for f, m in routes:
                if m[slot]:
                    f.write(texts[layouts.index(f.array)])
            if spill is not None and need[slot]:
                spill.add(slot, texts)
        for f, s, is_direct in zip(files, slots, direct, strict=True):
            if not is_direct:
                assert spill is not None
                spill.flush()
                layout = layouts.index(f.array)
                for start in range(0, len(s), 1 << 16):
                    for slot in s[start : start + (1 << 16)].tolist():
                        f.write(spill.get(slot, layout))
    except BaseException:
        for f in files:
            f.abort()
        raise
    finally:
        if spill is not None:
            spill.close()
    return [f.close() for f in files]


class _Spill:
    """Encoded rows by stream slot in an unlinked temporary file next to the outputs.

    A slot's texts (one per layout) lie back to back from ``start[slot]``.
    """

    def __init__(self, folder: Path, n: int, layouts: Sequence[bool]) -> None:
        self._f = tempfile.TemporaryFile(dir=folder, buffering=_BUFFER)  # noqa: SIM115
        self._start = np.zeros(n, np.int64)  # [n] byte offset of the slot's first text
        self._length = np.zeros((n, len(layouts)), np.int32)  # [n, layouts] text sizes
        self._end = 0

    def add(self, slot: int, texts: Sequence[bytes]) -> None:
        self._start[slot] = self._end
        for k, text in enumerate(texts):
            self._length[slot, k] = len(text)
            self._f.write(text)
            self._end += len(text)

    def flush(self) -> None:
        self._f.flush()

    def get(self, slot: int, layout: int) -> bytes:
        lengths = self._length[slot]
        start = int(self._start[slot]) + int(lengths[:layout].sum())
        return os.pread(self._f.fileno(), int(lengths[layout]), start)

    def close(self) -> None:
        self._f.close()
