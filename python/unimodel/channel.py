"""The worker's end of the control socket: frames in and out, with `SCM_RIGHTS` descriptors.

Reads go through one preallocated buffer with `recvmsg_into` (no per-frame allocation for the
bytes on the wire) and always leave room for ancillary data, because `execute` frames may
carry descriptors for inputs too large for the arena. Linux never merges a stream read across
a message that carries descriptors, so received descriptors are queued in arrival order and
each frame takes the ones it references, in order.
"""

from __future__ import annotations

import array
import os
import socket
from collections import deque
from typing import Any

import msgpack

from .protocol import (
    LENGTH,
    MAX_FRAME_BYTES,
    MESSAGE_KEYS,
    ProtocolError,
    decode_body,
    new_packer,
)

#: Most descriptors one frame may carry (one per tensor of a batch); sized for the ancillary buffer.
MAX_FDS_PER_READ = 64
_INITIAL_BUFFER = 1 << 20
_FD_SIZE = array.array("i").itemsize
# Plain ints: the socket module's flag enums make every `&` a Python-level call.
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)


class ChannelClosed(Exception):
    """The core closed its end of the socket (EOF), or a write to it failed: the worker exits."""


class Channel:
    """Frame reader/writer over the control socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._anc_size = socket.CMSG_SPACE(MAX_FDS_PER_READ * _FD_SIZE)
        #: Descriptors received and not yet claimed by a decoded frame, in arrival order.
        self.fds: deque[int] = deque()
        self._packer = new_packer()
        self._pack = self._packer.pack
        self._len = LENGTH.pack
        self._sendall = sock.sendall
        self._recvmsg_into = sock.recvmsg_into
        self._unpackb = msgpack.unpackb  # raw=False (str stays str) is the default

    # -- reading -----------------------------------------------------------------------------

    def _make_room(self, need: int) -> None:
        """Ensures `need` bytes fit after `_start`, compacting or growing the buffer."""
        pending = self._end - self._start
        if need > len(self._buf):
            new = bytearray(max(need, 2 * len(self._buf)))
            new[:pending] = self._view[self._start : self._end]
            self._buf = new
            self._view = memoryview(new)
        else:
            self._view[:pending] = self._view[self._start : self._end]
        self._start = 0
        self._end = pending

    def _fill(self, block: bool) -> bool:
        """Reads what the socket has; False if nothing was available (non-blocking only)."""
        if self._end == len(self._buf):
            # No room to read into: compact, or grow when the buffer holds one partial frame.
            self._make_room(2 * len(self._buf) if self._start == 0 else 0)
        try:
            n, ancdata, msg_flags, _ = self._recvmsg_into(
                [self._view[self._end :]], self._anc_size, 0 if block else _MSG_DONTWAIT
            )
        except BlockingIOError:
            return False
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            return False
        if ancdata:
            for level, kind, data in ancdata:
                if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
                    self.fds.extend(fds)
        if msg_flags & _MSG_CTRUNC:
            raise ProtocolError(
                f"a frame carried more than {MAX_FDS_PER_READ} file descriptors; some were lost"
            )
        if n == 0:
            raise ChannelClosed()
        self._end += n
        return True

    def _next_buffered(self) -> dict[str, Any] | None:
        start = self._start
        available = self._end - start
        if available < 4:
            return None
        (length,) = LENGTH.unpack_from(self._buf, start)
        if length > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {length} bytes exceeds MAX_FRAME_BYTES")
        if available < 4 + length:
            if 4 + length > len(self._buf) - start:
                self._make_room(4 + length)
            return None
        end = start + 4 + length
        message = self._unpackb(self._view[start + 4 : end])
        if type(message) is not dict or message.get("type") not in MESSAGE_KEYS:
            decode_body(self._view[start + 4 : end])  # raises the precise ProtocolError
        if end == self._end:
            self._start = self._end = 0
        else:
            self._start = end
        return message

    def recv(self) -> dict[str, Any]:
        """The next frame, blocking until one is complete. Raises `ChannelClosed` on EOF."""
        while True:
            message = self._next_buffered()
            if message is not None:
                return message
            self._fill(block=True)

    def poll(self) -> dict[str, Any] | None:
        """The next frame if one is already complete or arrives without blocking, else None."""
        message = self._next_buffered()
        if message is not None:
            return message
        if self._fill(block=False):
            return self._next_buffered()
        return None

    def buffered(self) -> bool:
        """True when bytes of a further frame are already read (no syscall needed to see them)."""
        return self._end > self._start

    def take_fds(self, count: int) -> list[int]:
        """Claims the next `count` received descriptors for the frame just decoded."""
        if count > len(self.fds):
            raise ProtocolError(
                f"frame references {count} file descriptors, only {len(self.fds)} were received"
            )
        return [self.fds.popleft() for _ in range(count)]

    # -- writing -----------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Sends one message; the dict must already be in wire key order.

        Raises `ChannelClosed` when the socket fails: part of the frame may be out already, so
        nothing more can be said on it.
        """
        body = self._pack(message)
        try:
            self._sendall(self._len(len(body)) + body)
        except OSError as e:
            raise ChannelClosed(f"control socket write failed: {e}") from e

    def send_with_fds(self, message: dict[str, Any], fds: list[int]) -> None:
        """Sends one message with descriptors attached to its first byte.

        A refused ``sendmsg`` (say, too many descriptors) sends nothing and raises `OSError`,
        which leaves the channel usable; a lost socket or a failure part-way through the frame
        raises `ChannelClosed`.
        """
        body = self._pack(message)
        frame = self._len(len(body)) + body
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self.sock.sendmsg([frame], anc)
        except ConnectionError as e:  # EPIPE, ECONNRESET: the core is gone
            raise ChannelClosed(f"control socket write failed: {e}") from e
        if sent < len(frame):
            try:
                self._sendall(memoryview(frame)[sent:])
            except OSError as e:
                raise ChannelClosed(f"control socket write failed: {e}") from e

    def close_unclaimed_fds(self) -> None:
        while self.fds:
            try:
                os.close(self.fds.popleft())
            except OSError:
                pass
