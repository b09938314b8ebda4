"""Streaming decoder for a top-level JSON array, one element at a time.

The file is read in byte chunks, decoded to text with a strict incremental UTF-8 decoder,
and each array element is decoded with ``json.JSONDecoder.raw_decode`` from a text buffer
that only holds the not yet consumed part of the file, so memory is bounded by the largest
element (plus one chunk), never by the file size.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterator
from typing import IO, Any

from resofilter_jax.data.records import DataError, TruncatedInputError

__all__ = ["iter_json_array"]

_NON_WS = re.compile(r"[^ \t\n\r]")
# Text that may be the start of an unfinished number, literal or escape at the buffer's end.
_PARTIAL = re.compile(r"[\w\\+\-.]{0,16}")


class _Feed:
    """A text buffer over a binary file that tracks the byte offset of its first character."""

    def __init__(self, f: IO[bytes], path: str, chunk_size: int):
        self.f = f
        self.path = path
        self.chunk_size = chunk_size
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.buf = ""
        self.base = 0  # byte offset of buf[0] in the file
        self.read_bytes = 0  # bytes read from the file so far
        self.eof = False

    def more(self) -> None:
        """Reads and decodes the next chunk (at least as large as the pending text)."""
        if self.eof:
            return
        size = max(self.chunk_size, len(self.buf))
        data = self.f.read(size)
        pending = len(self.decoder.getstate()[0])
        start = self.read_bytes - pending  # file offset of the decoder's input start
        self.read_bytes += len(data)
        if not data:
            self.eof = True
            try:
                self.buf += self.decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                # The file ends inside a multi-byte character: a cut-off file. The partial
                # character is left out; the caller reports the cut.
                pass
            return
        try:
            self.buf += self.decoder.decode(data)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self.path}: invalid UTF-8 at byte {start + e.start} ({e.reason}); "
                "a JSON array file must be valid UTF-8"
            ) from e

    def byte_offset(self, i: int) -> int:
        """Byte offset in the file of character ``i`` of the buffer."""
        return self.base + len(self.buf[:i].encode("utf-8"))

    def drop(self, i: int) -> None:
        """Forgets ``buf[:i]`` (already consumed)."""
        self.base = self.byte_offset(i)
        self.buf = self.buf[i:]

    def skip_ws(self, pos: int) -> int:
        """Returns the index of the next non-whitespace character (``len(buf)`` at EOF)."""
        while True:
            m = _NON_WS.search(self.buf, pos)
            if m is not None:
                return m.start()
            pos = len(self.buf)
            if self.eof:
                return pos
            self.more()


def _at_frontier(e: json.JSONDecodeError, buf: str) -> bool:
    """Whether a decode error may be caused by the buffer ending, not by bad syntax.

    That is the case for an unterminated string, or when all that follows the error
    position is whitespace or a short run of characters that can begin a number, literal
    or escape (``"Expecting value"`` at ``tru``, ``"Expecting ',' delimiter"`` at the end).
    """
    if e.msg.startswith("Unterminated string"):
        return True
    rest = buf[e.pos :].rstrip(" \t\n\r")
    return _PARTIAL.fullmatch(rest) is not None


def iter_json_array(
    path: str | os.PathLike[str], *, chunk_size: int = 4 << 20
) -> Iterator[tuple[int, Any]]:
    """Yields ``(index, value)`` for each element of a top-level JSON array file.

    Args:
        path: The JSON file.
        chunk_size: Bytes read per chunk.

    Raises:
        TruncatedInputError: After the last complete element, if the file ends before the
            closing ``]`` (the exception carries the record count and byte offsets).
        DataError: Invalid UTF-8, a syntax error (with record number and byte offset), an
            element the decoder cannot represent (nested too deeply, an integer with more
            digits than ``sys.get_int_max_str_digits()``), a top level that is not an
            array, or data after the closing ``]``.
    """
    path = str(path)
    decoder = json.JSONDecoder()
    total = os.path.getsize(path)
    with open(path, "rb") as f:
        feed = _Feed(f, path, chunk_size)
        pos = feed.skip_ws(0)
        if pos < len(feed.buf) and feed.buf[pos] == "\ufeff":
            pos = feed.skip_ws(pos + 1)
        if pos >= len(feed.buf):
            raise DataError(f"{path}: empty file, expected a JSON array")
        if feed.buf[pos] != "[":
            raise DataError(
                f"{path}: expected a JSON array ('[') at byte {feed.byte_offset(pos)}, found "
                f"{feed.buf[pos]!r}; for one object per line use reader='jsonl'"
            )
        last_end = pos + 1  # end of the last complete element (or of the '[')
        count = 0

        def cut_off() -> TruncatedInputError:
            offset = feed.byte_offset(last_end)
            return TruncatedInputError(
                f"{path}: the JSON array is cut off: {count} complete records were read and "
                f"the data breaks off after byte {offset} of {total} ({total - offset} bytes "
                "after the last complete record cannot be parsed). Pass allow_truncated=True "
                f"to use the {count} complete records.",
                path=path,
                records=count,
                offset=offset,
                bytes_total=total,
            )

        def syntax_error(what: str, at: int) -> DataError:
            return DataError(
                f"{path}: JSON syntax error in record {count} (0-based) at byte "
                f"{feed.byte_offset(at)}: {what}"
            )

        def undecodable(what: str, at: int) -> DataError:
            return DataError(
                f"{path}: cannot decode record {count} (0-based) at byte "
                f"{feed.byte_offset(at)}: {what}"
            )

        pos = last_end
        while True:
            pos = feed.skip_ws(pos)
            if pos >= len(feed.buf):
                raise cut_off()
            if count == 0 and feed.buf[pos] == "]":
                break
            # Decode one element; grow the buffer while the element may continue.
            while True:
                try:
                    value, end = decoder.raw_decode(feed.buf, pos)
                except json.JSONDecodeError as e:
                    if not _at_frontier(e, feed.buf):
                        raise syntax_error(e.msg, e.pos) from e
                    if feed.eof:
                        raise cut_off() from e
                    feed.more()
                    continue
                except RecursionError:
                    raise undecodable("nested too deeply for the JSON decoder", pos) from None
                except ValueError as e:  # e.g. an integer longer than int_max_str_digits
                    raise undecodable(str(e), pos) from e
                # A number or literal followed only by characters that may continue it (the
                # buffer ends at "1." or "2e") may go on in the next chunk, or be cut off.
                if not isinstance(value, dict | list | str) and _PARTIAL.fullmatch(feed.buf, end):
                    if feed.eof:
                        raise cut_off()
                    feed.more()
                    continue
                break
            yield count, value
            count += 1
            last_end = end
            pos = feed.skip_ws(end)
            if pos >= len(feed.buf):
                raise cut_off()
            sep = feed.buf[pos]
            if sep == "]":
                break
            if sep != ",":
                raise syntax_error(f"expected ',' or ']' after the record, found {sep!r}", pos)
            pos += 1
            if last_end > chunk_size:
                feed.drop(last_end)
                pos -= last_end
                last_end = 0
        pos = feed.skip_ws(pos + 1)
        if pos < len(feed.buf):
            raise DataError(
                f"{path}: unexpected data after the closing ']' at byte {feed.byte_offset(pos)}"
            )
