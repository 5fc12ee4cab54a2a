"""Where a chunked body ends (RFC 9112 §7.1), measured ahead of the parser.

The parser (llhttp) frames chunks and judges their syntax, but once a body ends it goes on
with whatever follows in the same read as the next request, and it never says where that
was. So the server measures the body with this scanner and feeds the parser up to the end
and no further: the bytes after it are a new request line, read as one (fixed for 0x80-0xFF,
counted against the head limit). The scanner reads only sizes and line ends; if it and the
parser ever disagree about the end, the server refuses the request.

Cost: a few steps a chunk, none a byte; a size line, an extension or a trailer line longer
than `max_line` is refused (the parser would buffer a trailer line whole).
"""

from __future__ import annotations

import enum
import re

#: what the parser takes as a chunk size: hex digits, at most 64 bits' worth
_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: a size line without extensions
_PLAIN = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")


class TooLong(Exception):
    """A size line or trailer line over `max_line`."""


class _At(enum.Enum):
    SIZE = "size"  # a chunk-size line (and its extensions)
    DATA = "data"  # chunk data
    DATA_END = "data_end"  # the CRLF after chunk data
    TRAILER = "trailer"  # a trailer line, or the empty line that ends the body


# The members under module-level names, for the hot path: on Python 3.11 reading an Enum
# member through its class costs about 90 ns, a global about 10 (3.12 made it 25).
_AT_SIZE, _AT_DATA, _AT_DATA_END, _AT_TRAILER = _At.SIZE, _At.DATA, _At.DATA_END, _At.TRAILER


class ChunkScanner:
    __slots__ = ("_at", "_need", "_partial", "_max_line", "_extensions")

    def __init__(self, max_line: int) -> None:
        self._at = _AT_SIZE
        self._need = 0  # data bytes, or CRLF bytes, still to come
        self._partial = b""  # the start of a line that began in an earlier read
        self._max_line = max_line
        self._extensions = 0  # bytes of chunk extensions so far: bounded like one line

    def scan(self, data: bytes) -> int:
        """The offset in `data` just past the body's end, or -1 if it does not end in it. A
        size line the parser will refuse is taken as the end, so that the parser is fed up to
        it and refuses it there."""
        pos, n = 0, len(data)
        while pos < n:
            at = self._at
            if at is _AT_DATA or at is _AT_DATA_END:
                take = min(self._need, n - pos)
                pos += take
                self._need -= take
                if not self._need:
                    if at is _AT_DATA:
                        self._at, self._need = _AT_DATA_END, 2
                    else:
                        self._at = _AT_SIZE
                continue
            if at is _AT_SIZE and not self._partial:
                # most chunks: a plain size line, then the data and its CRLF, all at hand
                m = _PLAIN.match(data, pos)
                if m is not None:
                    length = int(m[1], 16)
                    if length and m.end() + length + 2 <= n:
                        pos = m.end() + length + 2  # the parser judges the CRLF
                        continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._partial += data[pos:]
                if len(self._partial) > self._max_line:
                    raise TooLong()
                return -1
            line = self._partial + data[pos:nl] if self._partial else data[pos:nl]
            self._partial = b""
            if len(line) > self._max_line:
                raise TooLong()
            pos = nl + 1
            if at is _AT_SIZE:
                size = line.split(b";", 1)[0].rstrip(b"\r")
                if not _SIZE.fullmatch(size):
                    return pos  # not a size: the parser refuses it
                self._extensions += len(line.rstrip(b"\r")) - len(size)
                if self._extensions > self._max_line:  # endless extensions, a line at a time
                    raise TooLong()
                self._need = int(size, 16)
                self._at = _AT_DATA if self._need else _AT_TRAILER
            elif line in (b"", b"\r"):  # the empty line after the last chunk and its trailers
                return pos
        return -1
