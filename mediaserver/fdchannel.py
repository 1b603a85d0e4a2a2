"""Messages with file descriptors between the keeper and its workers.

One Unix stream socket, frames of `header + msgpack body`; a frame's file
descriptors travel (SCM_RIGHTS) with the sendmsg that carries its header, and
are received with MSG_CMSG_CLOEXEC so that no later child inherits them. On a
stream socket Linux never merges data across a sendmsg that carried
descriptors, so they arrive with, or before, the bytes of their frame: the
receiver queues descriptors as they come and gives each frame the count its
header names.

Stdlib and msgspec only: the keeper imports this.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import socket
import struct
from collections import deque
from typing import Any, Awaitable, Callable

import msgspec

HEADER = struct.Struct(">IH2x")
"""Body length, descriptor count."""
MAX_FDS = 253
"""SCM_MAX_FD: the kernel's limit of descriptors in one sendmsg."""
MAX_BODY = 256 * 1024 * 1024
_READ = 1 << 18
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class ChannelClosed(Exception):
    """The other end went away (its process exited, or closed the channel)."""


class Channel:
    """Both directions of one socket, on the running event loop.

    `send` never blocks (what the socket does not take is queued); messages
    that are not replies go to `on_message(message, fds)`; `request` sends a
    message with an `id` and waits for the reply naming it in `re`.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[dict[str, Any], list[int]], None] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_message = on_message or (lambda message, fds: None)
        self.on_closed = on_closed or (lambda: None)
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._in = bytearray()
        self._fds: deque[int] = deque()
        self._out: deque[list[Any]] = deque()
        """[frame bytes, fds, bytes already sent] not yet taken by the socket."""
        self._writing = False
        self._drained: list[asyncio.Future[None]] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._loop.add_reader(sock.fileno(), self._readable)

    # -- sending -------------------------------------------------------------

    def send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Queue `message`; the caller may close its copies of `fds` once this returns."""
        if self.closed:
            raise ChannelClosed("channel closed")
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
        body = _encoder.encode(message)
        # The kernel takes its own references at sendmsg; until then, ours.
        self._out.append([HEADER.pack(len(body), len(fds)) + body, [os.dup(fd) for fd in fds], 0])
        self._write()

    def _write(self) -> None:
        while self._out:
            frame, fds, sent = self._out[0]
            try:
                if fds:
                    n = self.sock.sendmsg(
                        [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                    for fd in fds:
                        os.close(fd)
                    self._out[0][1] = []
                else:
                    n = self.sock.send(memoryview(frame)[sent:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close()
                return
            sent += n
            if sent < len(frame):
                self._out[0][2] = sent
                break
            self._out.popleft()
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._write)
        elif not self._out:
            if self._writing:
                self._writing = False
                self._loop.remove_writer(self.sock.fileno())
            drained, self._drained = self._drained, []
            for future in drained:
                if not future.done():
                    future.set_result(None)

    async def drain(self) -> None:
        """Wait until every queued frame is in the kernel (the peer gets it even if we die)."""
        if self.closed:
            raise ChannelClosed("channel closed")
        if not self._out:
            return
        future = self._loop.create_future()
        self._drained.append(future)
        await future

    def request(
        self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = (), timeout: float | None = None
    ) -> Awaitable[tuple[dict[str, Any], list[int]]]:
        """Send now (the caller may close `fds` at once); await the result for the reply."""
        number = next(self._ids)
        future: asyncio.Future[tuple[dict[str, Any], list[int]]] = self._loop.create_future()
        self._waiting[number] = future
        try:
            self.send({**message, "id": number}, fds)
        except BaseException:
            del self._waiting[number]
            raise
        return self._reply_to(number, future, timeout)

    async def _reply_to(
        self, number: int, future: asyncio.Future[tuple[dict[str, Any], list[int]]], timeout: float | None
    ) -> tuple[dict[str, Any], list[int]]:
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(number, None)

    def reply(self, request: dict[str, Any], message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        self.send({**message, "re": request.get("id")}, fds)

    # -- receiving -----------------------------------------------------------

    def _readable(self) -> None:
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                _READ, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self._close()  # descriptors were lost: nothing after this can be trusted
            return
        if not data:
            self._close()
            return
        self._in += data
        while len(self._in) >= HEADER.size:
            length, count = HEADER.unpack_from(self._in)
            if length > MAX_BODY or count > MAX_FDS:
                self._close()
                return
            if len(self._in) < HEADER.size + length:
                break
            body = bytes(self._in[HEADER.size : HEADER.size + length])
            del self._in[: HEADER.size + length]
            if count > len(self._fds):
                self._close()
                return
            fds = [self._fds.popleft() for _ in range(count)]
            message = _decoder.decode(body)
            waiting = self._waiting.get(message.get("re")) if isinstance(message, dict) else None
            if waiting is not None:
                if not waiting.done():
                    waiting.set_result((message, fds))
                else:
                    _close_all(fds)
                continue
            self.on_message(message, fds)
            if self.closed:
                return

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        self._close(notify=False)

    def _close(self, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for _, fds, _ in self._out:
            _close_all(fds)
        self._out.clear()
        _close_all(self._fds)
        self._fds.clear()
        for future in [*self._waiting.values(), *self._drained]:
            if not future.done():
                future.set_exception(ChannelClosed("the other end closed the channel"))
        if notify:
            self.on_closed()


def _close_all(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
