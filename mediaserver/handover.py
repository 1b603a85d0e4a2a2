"""Moving live RTMP connections, with their state, from this worker to its successor.

Both sides run in workers, over a socketpair the keeper gave them. The sending
(serving) worker:

1. `prepare`: sends a copy of every connection's state. The successor decodes
   and validates each (the RTMP core, the HLS writer, the logic state migrated
   to its own logic version through relups/ when they differ) and answers with
   what it cannot take. Any refusal ends the upgrade here: nothing has moved.
   `--dry-run` stops after this step.
2. `move`, per connection: stop reading, export the state again (it is exact
   now: nothing is read any more), send it with the socket (SCM_RIGHTS). The
   successor rebuilds the connection with reading paused, acknowledges, and
   only then reads. The old worker closes its descriptor (never `shutdown()`)
   when the acknowledgement arrives; until then the connection is still
   whole on its side. If the successor dies before acknowledging, the old
   worker resumes reading as if nothing happened (the successor read nothing);
   a connection it acknowledged belongs to it, and dies with it (the old
   worker, serving on, then ends that stream's playlist as after a crash).
3. `done`: the successor starts accepting, recovers the playlists nobody
   publishes, and answers with the pause each stream saw.

Connections waiting for the publish webhook are moved once it has answered;
half-closed ones are finished by the old worker (they end on EOF). WHIP
publishers stay on the old worker, which serves only them until they end or
the drain timeout passes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable

import msgspec

from .fdchannel import Channel, ChannelClosed
from .hls.segmenter import WriterState
from .logsetup import event
from .proto.rtmp_state import ServerConnectionState, import_state
from .runtime.generation import Generation, load_generation, purge
from .runtime.relup import MIGRATIONS_MODULE, CodeServer
from .runtime.relup_spec import RelupSpecError, read_spec

if TYPE_CHECKING:
    from .transport.rtmp_server import RtmpConnection, RtmpServer

log = logging.getLogger("mediaserver.handover")

MOVE_VERSION = 1
PREPARE_TIMEOUT = 30.0
MOVE_WINDOW = 4
"""Connections in flight at once: enough to hide the round trip, few enough
that a connection does not wait behind many others in the successor (100
streams on 2 cores: held p99 63 ms with 16 in flight, 32 ms with 4; the
whole switch the same)."""
DEFER_LIMIT = 10.0
"""Seconds a connection that cannot move yet (webhook pending, output not
flushed) is waited for before it is left with the old worker."""
FIRST_READ_WAIT = 0.5


class MovedSession(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    logic_version: str
    logic_state: dict[str, Any]
    writer: WriterState
    segment_target: float = 0.0
    playlist_size: int = 0
    """The writer's settings: a live stream keeps them when the config changes (its
    playlist's EXT-X-TARGETDURATION must not change); new publishes take the new ones."""
    handled: int = 0
    crashes: int = 0
    quarantined: int = 0
    started_wall: float = 0.0


class MovedConnection(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    client: str
    host: str
    accepted_at: float
    last_activity: float
    connected: bool
    core: ServerConnectionState
    stream_name: str | None = None
    stream_id: int | None = None
    frames_in: dict[str, int] = {}
    published_at: float = 0.0
    last_read_at: float = 0.0
    """CLOCK_MONOTONIC (system-wide) of the old worker's last read: the pause starts here."""
    paused_at: float = 0.0
    """When the old worker stopped reading: from here on bytes wait in the kernel."""
    session: MovedSession | None = None


# -- the logic version a state needs -----------------------------------------------


class Migrations:
    """Migrations between logic versions, from the relup packages in relups/."""

    def __init__(self, relups_dir: Path) -> None:
        self.relups_dir = relups_dir
        self.edges: dict[str, tuple[str, Path]] = {}
        """from version -> (to version, package)."""
        if relups_dir.is_dir():
            for child in sorted(relups_dir.iterdir()):
                spec_path = child / "relup.toml"
                if child.is_dir() and not child.is_symlink() and spec_path.is_file():
                    try:
                        spec = read_spec(spec_path)
                    except RelupSpecError:
                        continue
                    self.edges.setdefault(spec.from_version, (spec.to_version, child))
        self._loaded: dict[Path, tuple[Generation, Any, Any]] = {}

    def chain_up(self, start: str, goal: str) -> list[Path] | None:
        """The packages that upgrade `start` to `goal`, in order, or None."""
        path: list[Path] = []
        version = start
        seen = {start}
        while version != goal:
            step = self.edges.get(version)
            if step is None or step[0] in seen:
                return None
            version, package = step
            seen.add(version)
            path.append(package)
        return path

    def _functions(self, package: Path) -> tuple[Any, Any]:
        loaded = self._loaded.get(package)
        if loaded is None:
            spec = read_spec(package / "relup.toml")
            if not spec.updates:
                identity = lambda state: state  # noqa: E731 - no state change in this step
                self._loaded[package] = loaded = (None, identity, identity)  # type: ignore[assignment]
            else:
                generation = load_generation(
                    (package / spec.load.path).resolve(), {MIGRATIONS_MODULE: package / "migrations.py"}
                )
                up, down = CodeServer._migrations(generation, spec)
                self._loaded[package] = loaded = (generation, up, down)
        return loaded[1], loaded[2]

    def migrate(self, state: dict[str, Any], from_version: str, generation: Generation) -> Any:
        """`state` (builtins) of `from_version` as a state of `generation`, validated."""
        if from_version != generation.version:
            up = self.chain_up(from_version, generation.version)
            if up is not None:
                for package in up:
                    state = self._functions(package)[0](state)
            else:
                down = self.chain_up(generation.version, from_version)
                if down is None:
                    raise ValueError(
                        f"no relup path between logic {from_version} (this stream's) and "
                        f"{generation.version} (the new worker's) in {self.relups_dir}"
                    )
                for package in reversed(down):
                    state = self._functions(package)[1](state)
            if not isinstance(state, dict):
                raise ValueError(f"a migration returned {type(state).__name__}, not dict")
        return msgspec.convert(state, generation.state_type)

    def close(self) -> None:
        for generation, _, _ in self._loaded.values():
            if generation is not None:
                purge(generation)
        self._loaded.clear()


# -- sending side (the serving worker) ------------------------------------------------


class HandoverSender:
    def __init__(self, app: Any, sock: socket.socket, dry_run: bool) -> None:
        self.app = app
        """The worker's parts (server.WorkerApp): rtmp, streams, code_server, whip."""
        self.channel = Channel(sock)
        self.dry_run = dry_run

    async def run(self) -> dict[str, Any]:
        report: dict[str, Any] = {"ok": False, "error": "", "moved": 0, "kept": [], "streams": []}
        code_server: CodeServer = self.app.code_server
        if code_server.lock.locked():
            report["error"] = "a relup is in progress: upgrade again when it has finished; nothing changed"
            self.channel.close()
            return report
        code_server.busy_reason = "an upgrade is moving the sessions to a new worker"
        try:
            await self._run(report)
        except ChannelClosed:
            report["error"] = report["error"] or "the new worker went away before the hand-over finished"
        except asyncio.TimeoutError:
            report["error"] = report["error"] or "the new worker did not answer in time"
        finally:
            self.channel.close()
            code_server.busy_reason = (
                "this worker has handed its sessions to the new worker" if report["ok"] and not self.dry_run else ""
            )
        return report

    async def _run(self, report: dict[str, Any]) -> None:
        app = self.app
        rtmp: RtmpServer = app.rtmp
        code_server: CodeServer = app.code_server
        connections = [c for c in rtmp.connections if c.movable_state() is None]
        states = []
        for connection in connections:
            states.append(msgspec.to_builtins(connection.export()))
        answer, _ = await self.channel.request(
            {
                "type": "prepare",
                "logic_version": code_server.current.version,
                "history": msgspec.to_builtins(code_server.history),
                "upgrades": app.upgrade_history,
                "connections": states,
            },
            timeout=PREPARE_TIMEOUT,
        )
        report["sessions"] = sum(1 for s in states if s.get("session"))
        report["connections"] = len(states)
        report["new_logic_version"] = answer.get("logic_version")
        report["preflight"] = answer.get("results", [])
        if not answer.get("ok"):
            report["error"] = answer.get("error") or "the new worker refused a state"
            report["session_errors"] = answer.get("errors", [])
            return
        if self.dry_run:
            self.channel.send({"type": "abort", "reason": "dry run"})
            await self.channel.drain()
            report["ok"] = True
            return
        started = time.perf_counter()
        rtmp.stop_accepting()
        moved, kept = await self._move_all(report)
        if report["error"]:
            await rtmp.resume_accepting()
            if moved:
                self._end_lost_playlists()
            return
        whip_names = app.whip_names()
        # From here the successor answers every new HTTP and admin connection.
        app.stop_public_listeners()
        try:
            finished, _ = await self.channel.request(
                {"type": "done", "kept": whip_names + [c.stream_name for c in kept if c.stream_name]},
                timeout=PREPARE_TIMEOUT,
            )
        except (ChannelClosed, asyncio.TimeoutError):
            # Everything acknowledged went with it; this worker serves what it kept.
            await app.resume_public_listeners()
            await rtmp.resume_accepting()
            self._end_lost_playlists()
            report["moved"] = moved
            report["error"] = (
                f"the new worker went away after taking {moved} connection(s) (lost with it); "
                "this worker goes on serving"
            )
            return
        report["switch_ms"] = round((time.perf_counter() - started) * 1000, 3)
        report["moved"] = moved
        report["kept"] = whip_names + [c.client for c in kept]
        report["streams"] = finished.get("streams", [])
        report["ok"] = True

    def _end_lost_playlists(self) -> None:
        """The successor died holding publishes: end their playlists as after any crash
        (a writer this worker no longer has is one it handed over)."""
        streams = self.app.streams
        streams.recover(skip=frozenset(streams.foreign))

    async def _move_all(self, report: dict[str, Any]) -> tuple[int, list[RtmpConnection]]:
        rtmp: RtmpServer = self.app.rtmp
        waiting = list(rtmp.connections)
        in_flight: set[asyncio.Task[None]] = set()
        moved = 0
        kept: list[RtmpConnection] = []
        deadline = time.monotonic() + DEFER_LIMIT
        errors: list[str] = []

        def send_move(connection: RtmpConnection) -> Awaitable[tuple[dict[str, Any], list[int]]]:
            """Pause, export and send in one step: no other callback runs between the
            last read and the state leaving (each loop turn is milliseconds under load)."""
            connection.pause_for_move()
            try:
                state = msgspec.to_builtins(connection.export())
                return self.channel.request(
                    {"type": "move", "connection": state}, [connection.socket_fd()], timeout=PREPARE_TIMEOUT
                )
            except BaseException:
                connection.resume_after_failed_move()
                raise

        async def move(connection: RtmpConnection, reply: Awaitable[tuple[dict[str, Any], list[int]]]) -> None:
            nonlocal moved
            try:
                answer, _ = await reply
            except (ChannelClosed, asyncio.TimeoutError):
                connection.resume_after_failed_move()
                raise
            if answer.get("ok"):
                connection.detach_moved()
                moved += 1
            else:
                errors.append(f"{connection.client}: {answer.get('error')}")
                connection.resume_after_failed_move()
                kept.append(connection)

        try:
            while waiting or in_flight:
                still: list[RtmpConnection] = []
                for connection in waiting:
                    if connection.closed:
                        continue
                    why = connection.movable_state()
                    if why is not None:
                        if why == "half-closed" or time.monotonic() > deadline:
                            kept.append(connection)
                        else:
                            still.append(connection)
                        continue
                    while len(in_flight) >= MOVE_WINDOW:
                        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                        in_flight -= done
                        for task in done:
                            task.result()
                    task = asyncio.get_running_loop().create_task(move(connection, send_move(connection)))
                    in_flight.add(task)
                waiting = still
                if in_flight:
                    done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight -= done
                    for task in done:
                        task.result()
                elif waiting:
                    await asyncio.sleep(0.02)
        except (ChannelClosed, asyncio.TimeoutError) as exc:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            for connection in rtmp.connections:
                if connection.paused_for_move:
                    connection.resume_after_failed_move()
            report["error"] = (
                f"the new worker went away during the move ({type(exc).__name__}): {moved} connection(s) "
                "it had acknowledged went with it; this worker kept every other one and goes on serving"
            )
            report["moved"] = moved
        if errors:
            report["refused"] = errors
        return moved, kept


# -- receiving side (the successor) ---------------------------------------------------------


class HandoverReceiver:
    def __init__(self, app: Any, sock: socket.socket) -> None:
        self.app = app
        self.channel = Channel(sock, self._on_message, self._on_closed)
        self.migrations = Migrations(Path(app.config.relup.directory))
        self.adopted: list[RtmpConnection] = []
        self.finished = asyncio.Event()
        self.failed = ""

    def _on_closed(self) -> None:
        if not self.finished.is_set():
            self.failed = "the serving worker closed the hand-over channel"
            self.finished.set()

    def _on_message(self, message: dict[str, Any], fds: list[int]) -> None:
        kind = message.get("type")
        loop = asyncio.get_running_loop()
        if kind == "prepare":
            loop.create_task(self._prepare(message))
        elif kind == "move":
            loop.create_task(self._move(message, fds))
        elif kind == "done":
            loop.create_task(self._done(message))
        elif kind == "abort":
            self.failed = str(message.get("reason", "aborted"))
            self.finished.set()
        else:
            for fd in fds:
                os.close(fd)

    async def _prepare(self, message: dict[str, Any]) -> None:
        app = self.app
        code_server: CodeServer = app.code_server
        errors: list[dict[str, str]] = []
        results: list[dict[str, Any]] = []
        try:
            await self._match_logic(str(message.get("logic_version")))
        except Exception as exc:
            self.channel.reply(message, {"ok": False, "error": f"logic: {exc}", "errors": [], "results": []})
            return
        app.adopt_history(message.get("history", []), message.get("upgrades", []))
        for item in message.get("connections", []):
            who = item.get("client", "?") if isinstance(item, dict) else "?"
            try:
                checked, _, _ = self._check(item)
                results.append({"client": who, "stream": checked.stream_name, "ok": True})
            except Exception as exc:
                errors.append({"client": who, "stream": (item.get("stream_name") if isinstance(item, dict) else None) or "", "reason": f"{type(exc).__name__}: {exc}"})
                results.append({"client": who, "ok": False, "reason": str(exc)})
        ok = not errors
        self.channel.reply(message, {
            "ok": ok, "logic_version": code_server.current.version, "errors": errors, "results": results,
            "error": "" if ok else f"the new worker cannot take {len(errors)} connection(s); first: "
            f"{errors[0]['client']} ({errors[0]['stream'] or 'no stream'}): {errors[0]['reason']}",
        })

    async def _match_logic(self, old_version: str) -> None:
        """Run the logic the old worker runs when relups reach it from ours (so revert still works)."""
        code_server: CodeServer = self.app.code_server
        chain = self.migrations.chain_up(code_server.current.version, old_version)
        if not chain:
            return
        for package in chain:
            report = await code_server.apply(package.name)
            if not report.ok:
                raise ValueError(f"relup {package.name} to match the serving worker failed: {report.error}")

    def _check(self, item: Any) -> tuple[MovedConnection, Any, Any]:
        """The connection, its rebuilt RTMP core and its logic state for this worker; raises why not."""
        moved = msgspec.convert(item, MovedConnection)
        if moved.version != MOVE_VERSION:
            raise ValueError(f"connection state version {moved.version} is not {MOVE_VERSION}")
        core = import_state(moved.core)
        logic_state = None
        if moved.session is not None:
            logic_state = self.migrations.migrate(
                moved.session.logic_state, moved.session.logic_version, self.app.code_server.current
            )
        return moved, core, logic_state

    async def _move(self, message: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self.channel.reply(message, {"ok": False, "error": f"{len(fds)} descriptors instead of 1"})
            return
        fd = fds[0]
        try:
            moved, core, logic_state = self._check(message["connection"])
            connection = await self.app.rtmp.adopt(socket.socket(fileno=fd), moved, core, logic_state)
        except Exception as exc:
            event(log, logging.WARNING, "connection not adopted", reason=f"{type(exc).__name__}: {exc}")
            try:
                os.close(fd)
            except OSError:
                pass
            self.channel.reply(message, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.adopted.append(connection)
        self.channel.reply(message, {"ok": True})
        try:
            await self.channel.drain()  # the old worker will know, even if we die from here on
        except ChannelClosed:
            pass
        connection.resume_after_adopt()

    async def _done(self, message: dict[str, Any]) -> None:
        await self.app.take_over(list(message.get("kept", [])))
        deadline = time.monotonic() + FIRST_READ_WAIT
        while time.monotonic() < deadline and any(
            c.first_read_at is None and c.session is not None and not c.closed for c in self.adopted
        ):
            await asyncio.sleep(0.01)
        streams = [c.pause_report() for c in self.adopted]
        self.channel.reply(message, {"type": "finished", "streams": streams})
        self.finished.set()
        self.migrations.close()
