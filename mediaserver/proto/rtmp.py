"""RTMP connection cores, sans-I/O: `feed(bytes) -> events`, `data_to_send()`.

`ServerConnection` accepts publishers (ffmpeg, OBS/librtmp, GStreamer);
`ClientConnection` publishes, for tests and test publishers. Neither touches
a socket or a clock.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import amf0, handshake
from .chunk import ChunkReader, ChunkWriter, RawMessage, check_chunk_size
from .errors import ProtocolError

# Message type ids.
SET_CHUNK_SIZE, ABORT, ACK, USER_CONTROL, WINDOW_ACK_SIZE, SET_PEER_BANDWIDTH = 1, 2, 3, 4, 5, 6
AUDIO, VIDEO, DATA_AMF3, COMMAND_AMF3, DATA_AMF0, COMMAND_AMF0 = 8, 9, 15, 17, 18, 20
# User control events.
STREAM_BEGIN, PING_REQUEST, PING_RESPONSE = 0, 6, 7
# Chunk stream ids used for what we send.
CSID_CONTROL, CSID_COMMAND, CSID_STREAM, CSID_AUDIO, CSID_VIDEO = 2, 3, 5, 6, 7

_HANDSHAKE_C0C1 = 1 + handshake.SIZE
PRE_CONNECT_MESSAGE_SIZE = 8192
"""Longest message accepted before `connect`: commands of a few hundred bytes
are all a client sends then, and nobody has been let in yet."""


# -- events -------------------------------------------------------------------


class HandshakeDone(msgspec.Struct, gc=False):
    pass


class ConnectRequest(msgspec.Struct):
    transaction_id: float
    app: str
    tc_url: str
    args: dict[str, Any]


class PublishRequest(msgspec.Struct, gc=False):
    stream_id: int
    name: str
    query: str
    publish_type: str


class Unpublish(msgspec.Struct, gc=False):
    stream_id: int


class Metadata(msgspec.Struct):
    stream_id: int
    values: dict[str, Any]


class AudioMessage(msgspec.Struct, gc=False):
    stream_id: int
    timestamp: int
    payload: memoryview


class VideoMessage(msgspec.Struct, gc=False):
    stream_id: int
    timestamp: int
    payload: memoryview


class UnknownCommand(msgspec.Struct, gc=False):
    name: str


class ConnectResult(msgspec.Struct):
    ok: bool
    info: dict[str, Any]


class StreamCreated(msgspec.Struct, gc=False):
    stream_id: int


class PublishStatus(msgspec.Struct, gc=False):
    code: str
    level: str
    description: str


def _stream_id(value: float) -> int:
    """A stream id sent as an AMF0 number: a whole number in 0..2**32-1."""
    if not (0 <= value <= 0xFFFFFFFF) or value != int(value):  # NaN fails the range test
        raise ProtocolError(f"stream id {value!r} is not a whole number in 0..4294967295")
    return int(value)


def _command(payload: memoryview, type_id: int) -> list[Any]:
    if type_id in (COMMAND_AMF3, DATA_AMF3) and len(payload) and payload[0] == 0:
        payload = payload[1:]
    values = amf0.decode(payload)
    if not values or not isinstance(values[0], str):
        raise ProtocolError(f"command message does not start with a name: {values[:1]!r}")
    return values


class _Connection:
    def __init__(self, out_chunk_size: int, max_message_size: int, compress: bool) -> None:
        self._reader = ChunkReader(max_message_size)
        self._writer = ChunkWriter(128, compress=compress)
        self._out_chunk_size = out_chunk_size
        self._pending = bytearray()
        self.handshake_complete = False
        self.window_ack_size = 2_500_000
        self.bytes_received = 0

    def data_to_send(self) -> bytes:
        if self._writer.out:
            self._pending += self._writer.take()
        if not self._pending:
            return b""
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def _send(self, csid: int, type_id: int, stream_id: int, timestamp: int, payload: bytes) -> None:
        if self._writer.out:
            self._pending += self._writer.take()
        self._writer.write(csid, type_id, stream_id, timestamp, payload)

    def _send_control(self, type_id: int, payload: bytes) -> None:
        self._send(CSID_CONTROL, type_id, 0, 0, payload)

    def _set_out_chunk_size(self, size: int) -> None:
        self._send_control(SET_CHUNK_SIZE, size.to_bytes(4, "big"))
        self._pending += self._writer.take()
        self._writer.chunk_size = size

    def _send_command(self, stream_id: int, *values: Any) -> None:
        csid = CSID_STREAM if stream_id else CSID_COMMAND
        self._send(csid, COMMAND_AMF0, stream_id, 0, amf0.encode(*values))

    def _control(self, message: RawMessage) -> None:
        """Protocol control messages common to both sides."""
        payload = message.payload
        if message.type_id == WINDOW_ACK_SIZE and len(payload) >= 4:
            self.window_ack_size = max(int.from_bytes(payload[:4], "big"), 1)
        elif message.type_id == USER_CONTROL and len(payload) >= 6:
            if int.from_bytes(payload[:2], "big") == PING_REQUEST:
                self._send_control(USER_CONTROL, PING_RESPONSE.to_bytes(2, "big") + bytes(payload[2:6]))


class ServerConnection(_Connection):
    def __init__(
        self,
        *,
        max_message_size: int = 8 * 1024 * 1024,
        out_chunk_size: int = 4096,
        window_ack_size: int = 2_500_000,
    ) -> None:
        super().__init__(out_chunk_size, min(max_message_size, PRE_CONNECT_MESSAGE_SIZE), compress=False)
        self._max_message_size = max_message_size
        self._hs = bytearray()
        self._hs_stage = 0  # 0: waiting C0+C1, 1: waiting C2, 2: done
        self._own_window = window_ack_size
        self._acked = 0
        self.connected = False
        """The caller accepted the connect."""
        self._connect_requested = False
        self._next_stream_id = 1
        self._streams: set[int] = set()
        self._publishing: set[int] = set()
        self._connect_txid = 0.0
        self._object_encoding = 0.0
        self.failed: ProtocolError | None = None

    def feed(self, data: bytes | memoryview) -> list[Any]:
        """Events for `data`. After a ProtocolError the connection is failed:
        every later feed raises it again (the caller closes the connection)."""
        if self.failed is not None:
            raise ProtocolError(f"connection already failed: {self.failed}")
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self.failed = exc
            raise

    def _feed(self, data: bytes | memoryview) -> list[Any]:
        events: list[Any] = []
        if self._hs_stage < 2:
            self._hs += data
            data = self._handshake(events)
            if self._hs_stage < 2:
                return events
        if not data:
            return events
        self.bytes_received += len(data)
        for message in self._reader.feed(data):
            self._dispatch(message, events)
        if self.bytes_received - self._acked >= self.window_ack_size:
            self._acked = self.bytes_received
            self._send_control(ACK, (self.bytes_received & 0xFFFFFFFF).to_bytes(4, "big"))
        return events

    def where(self) -> str:
        """Where the session is, for a log line when the peer goes away."""
        if self._hs_stage == 0:
            return f"during the handshake ({len(self._hs)} of {_HANDSHAKE_C0C1} bytes of C0+C1)"
        if self._hs_stage == 1:
            return f"during the handshake ({len(self._hs)} of {handshake.SIZE} bytes of C2)"
        if not self._connect_requested:
            return "before connect"
        if self._reader.buffered:
            return f"mid-message ({self._reader.buffered} bytes of unfinished chunks)"
        return ""

    def _handshake(self, events: list[Any]) -> bytes:
        if self._hs_stage == 0:
            if self._hs and self._hs[0] != handshake.VERSION:
                raise ProtocolError(
                    f"handshake version {self._hs[0]} is not 3 (not RTMP, or encrypted RTMPE)"
                )
            if len(self._hs) < _HANDSHAKE_C0C1:
                return b""
            c1 = bytes(self._hs[1:_HANDSHAKE_C0C1])
            del self._hs[:_HANDSHAKE_C0C1]
            self._pending += handshake.server_reply(c1)
            self._hs_stage = 1
        if self._hs_stage == 1:
            if len(self._hs) < handshake.SIZE:
                return b""
            rest = bytes(self._hs[handshake.SIZE :])
            self._hs.clear()
            self._hs_stage = 2
            self.handshake_complete = True
            events.append(HandshakeDone())
            return rest
        return b""

    def _dispatch(self, message: RawMessage, events: list[Any]) -> None:
        type_id = message.type_id
        if type_id == VIDEO:
            events.append(VideoMessage(message.stream_id, message.timestamp, message.payload))
        elif type_id == AUDIO:
            events.append(AudioMessage(message.stream_id, message.timestamp, message.payload))
        elif type_id in (COMMAND_AMF0, COMMAND_AMF3):
            self._on_command(message, _command(message.payload, type_id), events)
        elif type_id in (DATA_AMF0, DATA_AMF3):
            values = _command(message.payload, type_id)
            if values[0] == "@setDataFrame":
                values = values[1:]
            if values and values[0] == "onMetaData" and len(values) > 1 and isinstance(values[1], dict):
                events.append(Metadata(message.stream_id, dict(values[1])))
        else:
            self._control(message)

    def _on_command(self, message: RawMessage, values: list[Any], events: list[Any]) -> None:
        name = values[0]
        txid = values[1] if len(values) > 1 and isinstance(values[1], float) else 0.0
        args = values[3:]
        if name == "connect":
            if self._connect_requested:
                raise ProtocolError("second connect on one connection")
            self._connect_requested = True
            # Only now may messages be as large as media needs.
            self._reader.max_message_size = self._max_message_size
            props = values[2] if len(values) > 2 and isinstance(values[2], dict) else {}
            self._connect_txid = txid
            encoding = props.get("objectEncoding", 0.0)
            self._object_encoding = float(encoding) if isinstance(encoding, (int, float)) else 0.0
            events.append(
                ConnectRequest(txid, str(props.get("app", "")), str(props.get("tcUrl", "")), props)
            )
            return
        if not self._connect_requested:
            # Clients may send the next commands before connect's answer: the
            # caller rejecting the connect closes the connection anyway.
            raise ProtocolError(f"command {name!r} before connect")
        if name in ("releaseStream", "FCPublish"):
            if name == "FCPublish":
                stream = args[0] if args and isinstance(args[0], str) else ""
                self._send_command(0, "onFCPublish", 0, None, {"code": "NetStream.Publish.Start", "description": stream})
            if txid:
                self._send_command(0, "_result", txid, None, amf0.Undefined)
        elif name == "createStream":
            stream_id = self._next_stream_id
            self._next_stream_id += 1
            self._streams.add(stream_id)
            self._send_command(0, "_result", txid, None, float(stream_id))
        elif name == "publish":
            stream_id = message.stream_id
            if stream_id not in self._streams:
                raise ProtocolError(f"publish on stream id {stream_id} that was never created")
            full = args[0] if args and isinstance(args[0], str) else ""
            kind = args[1] if len(args) > 1 and isinstance(args[1], str) else "live"
            name_part, _, query = full.partition("?")
            events.append(PublishRequest(stream_id, name_part, query, kind))
        elif name in ("FCUnpublish", "deleteStream", "closeStream"):
            if name == "deleteStream":
                stream_id = _stream_id(args[0]) if args and isinstance(args[0], float) else message.stream_id
            else:
                stream_id = message.stream_id or min(self._publishing, default=0)
            if stream_id in self._publishing:
                self._publishing.discard(stream_id)
                events.append(Unpublish(stream_id))
        elif name in ("getStreamLength", "_checkbw"):
            if txid:
                self._send_command(0, "_result", txid, None, 0.0)
        else:
            events.append(UnknownCommand(name))

    # -- replies the caller decides ---------------------------------------------

    def accept_connect(self) -> None:
        self.connected = True
        self._send_control(WINDOW_ACK_SIZE, self._own_window.to_bytes(4, "big"))
        self._send_control(SET_PEER_BANDWIDTH, self._own_window.to_bytes(4, "big") + b"\x02")
        self._set_out_chunk_size(self._out_chunk_size)
        self._send_command(
            0,
            "_result",
            self._connect_txid,
            {"fmsVer": "FMS/3,0,1,123", "capabilities": 31.0},
            {
                "level": "status",
                "code": "NetConnection.Connect.Success",
                "description": "Connection succeeded.",
                "objectEncoding": self._object_encoding,
            },
        )

    def reject_connect(self, description: str) -> None:
        self._send_command(
            0,
            "_error",
            self._connect_txid,
            None,
            {"level": "error", "code": "NetConnection.Connect.Rejected", "description": description},
        )

    def accept_publish(self, stream_id: int) -> None:
        self._publishing.add(stream_id)
        self._send_control(USER_CONTROL, STREAM_BEGIN.to_bytes(2, "big") + stream_id.to_bytes(4, "big"))
        self._send_command(
            stream_id,
            "onStatus",
            0,
            None,
            {"level": "status", "code": "NetStream.Publish.Start", "description": "Publishing started."},
        )

    def reject_publish(self, stream_id: int, code: str, description: str) -> None:
        self._send_command(
            stream_id, "onStatus", 0, None, {"level": "error", "code": code, "description": description}
        )


class ClientConnection(_Connection):
    """A publishing client: connect, createStream, publish, then media."""

    def __init__(self, *, out_chunk_size: int = 4096, digest: bool = False, compress: bool = True) -> None:
        super().__init__(out_chunk_size, 64 * 1024 * 1024, compress=compress)
        hello, self._digest = handshake.client_hello(digest)
        self._pending += hello
        self._hs = bytearray()
        self._hs_done = False
        self._txid = 0
        self._pending_txids: dict[float, str] = {}
        self.stream_id = 0
        self.server_verified: bool | None = None

    def feed(self, data: bytes | memoryview) -> list[Any]:
        events: list[Any] = []
        if not self._hs_done:
            self._hs += data
            need = 1 + 2 * handshake.SIZE
            if len(self._hs) < need:
                return events
            if self._hs[0] != handshake.VERSION:
                raise ProtocolError(f"server handshake version {self._hs[0]} is not 3")
            s1 = bytes(self._hs[1 : 1 + handshake.SIZE])
            s2 = bytes(self._hs[1 + handshake.SIZE : need])
            if self._digest is not None:
                self.server_verified = handshake.verify_server(s1, s2, self._digest)
            data = bytes(self._hs[need:])
            self._hs.clear()
            self._hs_done = self.handshake_complete = True
            self._pending += s1  # C2 echoes S1
            self._set_out_chunk_size(self._out_chunk_size)
            events.append(HandshakeDone())
        if data:
            for message in self._reader.feed(data):
                self._dispatch(message, events)
        return events

    def _dispatch(self, message: RawMessage, events: list[Any]) -> None:
        if message.type_id not in (COMMAND_AMF0, COMMAND_AMF3):
            self._control(message)
            return
        values = _command(message.payload, message.type_id)
        name = values[0]
        txid = values[1] if len(values) > 1 else 0.0
        info = values[3] if len(values) > 3 and isinstance(values[3], dict) else {}
        if name in ("_result", "_error") and txid in self._pending_txids:
            request = self._pending_txids.pop(txid)
            if request == "connect":
                events.append(ConnectResult(name == "_result", info))
            elif request == "createStream" and name == "_result":
                self.stream_id = int(values[3]) if len(values) > 3 and isinstance(values[3], float) else 1
                events.append(StreamCreated(self.stream_id))
        elif name == "onStatus":
            events.append(
                PublishStatus(str(info.get("code", "")), str(info.get("level", "")), str(info.get("description", "")))
            )

    def _call(self, name: str, *args: Any, stream_id: int = 0) -> None:
        self._txid += 1
        self._pending_txids[float(self._txid)] = name
        self._send_command(stream_id, name, float(self._txid), *args)

    def connect(self, app: str, tc_url: str) -> None:
        self._call("connect", {"app": app, "type": "nonprivate", "flashVer": "FMLE/3.0", "tcUrl": tc_url})

    def create_stream(self) -> None:
        self._call("createStream", None)

    def publish(self, name: str) -> None:
        self._send_command(self.stream_id, "publish", 0.0, None, name, "live")

    def send_metadata(self, values: dict[str, Any]) -> None:
        payload = amf0.encode("@setDataFrame", "onMetaData", amf0.ECMAArray(values))
        self._send(CSID_STREAM, DATA_AMF0, self.stream_id, 0, payload)

    def send_audio(self, timestamp: int, payload: bytes) -> None:
        self._send(CSID_AUDIO, AUDIO, self.stream_id, timestamp, payload)

    def send_video(self, timestamp: int, payload: bytes) -> None:
        self._send(CSID_VIDEO, VIDEO, self.stream_id, timestamp, payload)

    def set_chunk_size(self, size: int) -> None:
        self._set_out_chunk_size(check_chunk_size(size))

    def delete_stream(self) -> None:
        self._send_command(0, "FCUnpublish", 0.0, None, "")
        self._send_command(0, "deleteStream", 0.0, None, float(self.stream_id))
