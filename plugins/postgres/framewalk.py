# Stepping over Postgres wire frames: the relay's only per-frame loop.
#
# Owns: ``walk``, which reads frame headers from a position in a chunk and
# reports the frames whose type the caller's table marks; ``count``, which
# only counts the frames of one type; ``tally``, which counts the frames a
# table marks and says which marks it met; and ``Cursor``, where a walk stands
# between the chunks of one direction of a connection. The C version
# (_framewalk.c) is used where it was built; this Python one is the fallback
# and the oracle the tests compare it with. Must not know what a frame means.
#
# Measured (docs/performance.md): reading headers in Python cost 2-5 µs of
# gateway CPU per pgbench transaction, about 10% of throughput on the
# benchmark machine; the C loop makes it a single call per chunk.
from __future__ import annotations

import struct

__all__ = ["Cursor", "FrameError", "IMPLEMENTATION", "count", "count_py", "tally", "tally_py",
           "walk", "walk_py"]

_len = struct.Struct("!i").unpack_from


class FrameError(ValueError):
    """A frame header with a length below 4: args are (begin, type, length)."""


def walk_py(data: bytes, pos: int, table: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """Step over frames in ``data`` from ``pos`` (a frame boundary).

    "The first byte of a message identifies the message type, and the next four
    bytes specify the length of the rest of the message (this length count
    includes itself, but not the message-type byte)."

    :param data: a chunk of one direction of a connection.
    :param pos: where the first frame header starts (0 <= pos).
    :param table: 256 bytes; frames whose type has a non-zero entry are reported.
    :returns: ``(next, hits)``: ``next`` is where the first frame whose header
        is not all in ``data`` starts (``next < len(data)``: a split header
        from there on), or the end of the last frame read (``next >=
        len(data)``; past it when that frame continues in the next chunk);
        ``hits`` is ``(type, begin, end)`` of each reported frame, in order,
        ``end`` possibly past ``len(data)``.
    :raises FrameError: a length word below 4 (nothing is reported then).
    """
    n = len(data)
    hits: list[tuple[int, int, int]] = []
    while n - pos >= 5:
        kind = data[pos]
        length = _len(data, pos + 1)[0]
        if length < 4:
            raise FrameError(pos, kind, length)
        begin = pos
        pos += 1 + length
        if table[kind]:
            hits.append((kind, begin, pos))
    return pos, hits


def count_py(data: bytes, pos: int, kind: int) -> tuple[int, int]:
    """Step over frames as ``walk`` does, counting those of type ``kind``.

    For a side of a connection where only how many frames of one type came
    matters (an unmirrored session's ReadyForQuery frames): no list, no tuple
    per frame.

    :returns: ``(next, found)``, ``next`` as for ``walk``; a frame counts as
        soon as its header is in ``data``.
    :raises FrameError: a length word below 4 (nothing is counted then).
    """
    n = len(data)
    found = 0
    while n - pos >= 5:
        k = data[pos]
        length = _len(data, pos + 1)[0]
        if length < 4:
            raise FrameError(pos, k, length)
        pos += 1 + length
        if k == kind:
            found += 1
    return pos, found


def tally_py(data: bytes, pos: int, table: bytes) -> tuple[int, int, int, int]:
    """Step over frames as ``walk`` does, reporting in four integers only.

    For a chunk that is all of one common shape (a dark session's Bind/
    Execute/Sync batches, its primary's answers): the caller learns whether
    it is, and how many units it holds, without a tuple per frame.

    :param table: 256 bytes; each frame's entry is or-ed into ``flags``, and
        frames whose entry has bit 1 set are counted.
    :returns: ``(next, found, flags, last)``: ``next`` as for ``walk``;
        ``found`` the frames counted; ``flags`` the or of the entries of
        every frame whose header is in ``data``; ``last`` the end of the last
        frame counted (possibly past ``len(data)``), or -1.
    :raises FrameError: a length word below 4 (nothing is reported then).
    """
    n = len(data)
    found = flags = 0
    last = -1
    while n - pos >= 5:
        kind = data[pos]
        length = _len(data, pos + 1)[0]
        if length < 4:
            raise FrameError(pos, kind, length)
        pos += 1 + length
        mark = table[kind]
        flags |= mark
        if mark & 1:
            found += 1
            last = pos
    return pos, found, flags, last


try:
    from ._framewalk import FrameError as _CFrameError
    from ._framewalk import count, tally, walk
except ImportError:  # not built: the Python loop does the same
    walk = walk_py
    count = count_py
    tally = tally_py
    IMPLEMENTATION = "python"
else:
    FrameError = _CFrameError  # type: ignore[misc, assignment]  # noqa: F811
    IMPLEMENTATION = "c"


class Cursor:
    """Where a walk over one direction of a connection stands between chunks.

    ``skip``: bytes of the current frame still to come; ``tail``: the start of
    a frame kept whole for the next chunk (a header split across chunks, or a
    frame its reader needs a byte of: ``hold``).
    """

    __slots__ = ("skip", "tail")

    def __init__(self) -> None:
        self.skip = 0
        self.tail = b""

    def walk(self, data: bytes, table: bytes
             ) -> tuple[bytes, list[tuple[int, int, int]], tuple[int, int, int] | None]:
        """Walk the next chunk from where the last one left off.

        :returns: the chunk (with any kept bytes before it), the frames the
            table marks as ``walk`` reports them, and ``(begin, type,
            length)`` of a malformed frame or None (the frames before it are
            reported all the same).
        """
        if self.tail:
            data = self.tail + data
            self.tail = b""
        n = len(data)
        pos = self.skip
        if pos >= n:
            self.skip = pos - n
            return data, [], None
        bad = None
        try:
            pos, hits = walk(data, pos, table)
        except FrameError as exc:
            bad = exc.args
            pos, hits = walk(data[:bad[0]], pos, table)
        self.stop(data, pos)
        return data, hits, bad

    def stop(self, data: bytes, pos: int) -> None:
        """A walk over ``data`` stopped at ``pos`` (its ``next``): keep a
        split header, or note the bytes of the last frame still to come."""
        if pos < len(data):
            self.tail = data[pos:]
            self.skip = 0
        else:
            self.skip = pos - len(data)

    def hold(self, data: bytes, begin: int) -> None:
        """Keep ``data`` from ``begin`` (a frame the reader needs whole) for the next chunk."""
        self.tail = data[begin:]
        self.skip = 0
