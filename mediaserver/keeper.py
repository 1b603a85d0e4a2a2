"""The keeper: the one process of the server that is never replaced by another.

It binds every listening socket, runs the server itself as a worker process
that it hands those sockets to, starts a new worker when one dies, and runs
the upgrade: a successor worker is started from the code and config on disk
now, and the serving worker moves its live connections to it (see
`handover.py`, run inside the workers). The keeper holds no stream state and
imports nothing of the media path (no PyAV, aiortc, numpy), so it has almost
no reason to change; when it must, `mediaserver upgrade --keeper` re-executes
it in place, with its sockets and its workers kept.

Messages with the workers (`fdchannel`), keeper -> worker: `start` (role,
config path, listeners with their fds), `handover` (the end of a socketpair to
the other worker), `active`, `webrtc` (the UDP sockets, once the previous
worker released them). Worker -> keeper: `ready`, `failed`, `upgrade` and
`upgrade_keeper` (from the admin API), `workers`, `released`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config
from .fdchannel import Channel, ChannelClosed
from .logsetup import event

log = logging.getLogger("mediaserver.keeper")

START_TIMEOUT = 60.0
"""Seconds a worker has to load before it is given up on."""
HANDOVER_TIMEOUT = 60.0
STOP_GRACE = 10.0
RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Delay before each quick successive restart of a dying worker."""
STATE_ENV = "MEDIASERVER_KEEPER_STATE"
CHANNEL_ENV = "MEDIASERVER_KEEPER_FD"


class Listener:
    """One bound socket: `kind` is rtmp, http, admin or webrtc."""

    def __init__(self, kind: str, sock: socket.socket) -> None:
        self.kind = kind
        self.sock = sock

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "family": int(self.sock.family), "type": int(self.sock.type)}


def bind_listeners(config: Config) -> list[Listener]:
    """Bind what the config asks for, as the worker would have; OSError says which."""
    listeners: list[Listener] = []
    try:
        for kind, host, port in (
            ("rtmp", config.rtmp.host, config.rtmp.port),
            ("http", config.http.host, config.http.port),
            ("admin", config.admin.host, config.admin.port),
        ):
            for sock in _bind_tcp(host, port):
                listeners.append(Listener(kind, sock))
    except OSError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def _bind_tcp(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    seen: set[tuple[Any, ...]] = set()
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror}") from None
            sock.listen(1024)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class Worker:
    def __init__(self, pid: int, role: str, channel: Channel | None) -> None:
        self.pid = pid
        self.role = role
        """first, restart or successor: how it was started."""
        self.channel = channel
        self.status = "starting"
        """starting, serving, retiring (moved its connections, finishing the rest) or exited."""
        self.started = time.time()
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.info: dict[str, Any] = {}
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopped_by_keeper = False

    def describe(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "role": self.role, "status": self.status,
            "started": self.started, "version": self.info.get("version"),
            "package_version": self.info.get("package_version"),
            "python": self.info.get("python"), "kept": self.info.get("kept", []),
        }


class Keeper:
    def __init__(
        self, config_path: str | None, options: dict[str, Any], listeners: list[Listener], data_dir: str = ""
    ) -> None:
        self.config_path = config_path
        self.data_dir = data_dir
        """Where the workers write (resolved): it cannot change under live streams."""
        self.log_settings: dict[str, str] = {}
        """Log level and format the keeper itself logs with (kept across a re-exec)."""
        self.options = options
        """CLI overrides passed to every worker (log level and format)."""
        self.listeners = listeners
        self.workers: dict[int, Worker] = {}
        self.serving: Worker | None = None
        self.upgrading = False
        self.history: list[dict[str, Any]] = []
        self.started = time.time()
        self._stop = asyncio.Event()
        self._stopping = False
        self._restarts: list[float] = []
        self._reexec: dict[str, Any] | None = None

    # -- workers -------------------------------------------------------------

    def _spawn(self, role: str) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env[CHANNEL_ENV] = str(theirs.fileno())
        env.pop(STATE_ENV, None)
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "mediaserver", "worker"],
                pass_fds=[theirs.fileno()], env=env, close_fds=True,
            )
        finally:
            theirs.close()
        worker = Worker(popen.pid, role, None)
        worker.popen = popen
        self._attach(worker, ours)
        worker.channel.send(  # type: ignore[union-attr]
            {
                "type": "start", "role": role, "config": self.config_path,
                "options": self.options, "keeper_pid": os.getpid(), "data_dir": self.data_dir,
                "listeners": [listener.describe() for listener in self.listeners],
            },
            [listener.sock.fileno() for listener in self.listeners],
        )
        event(log, logging.INFO, "worker started", pid=worker.pid, role=role)
        return worker

    def _attach(self, worker: Worker, sock: socket.socket) -> None:
        self.workers[worker.pid] = worker
        worker.channel = Channel(
            sock,
            on_message=lambda message, fds: self._on_message(worker, message, fds),
            on_closed=lambda: None,
        )
        pidfd = os.pidfd_open(worker.pid)
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, self._reap, worker, pidfd)

    def _reap(self, worker: Worker, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(worker.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = -1
        if worker.popen is not None:
            worker.popen.returncode = code  # reaped here: Popen must not wait again
        worker.status = "exited"
        self.workers.pop(worker.pid, None)
        if worker.channel is not None:
            worker.channel.close()
        if not worker.ready.done():
            worker.ready.set_exception(WorkerFailed(f"worker {worker.pid} exited with status {code} while starting"))
        worker.exited.set_result(code)
        # A worker the keeper stopped itself (a refused successor, shutdown) is no error.
        level = logging.INFO if code == 0 or self._stopping or worker.stopped_by_keeper else logging.ERROR
        event(log, level, "worker exited", pid=worker.pid, role=worker.role, status=code)
        if worker is self.serving:
            self.serving = None
            if not self._stopping:
                loop.create_task(self._replace_dead(worker, code))
        self._tell_foreign()
        self._release_webrtc_if_free()

    async def _replace_dead(self, dead: Worker, code: int) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        delay = RESTART_BACKOFF[min(len(self._restarts) - 1, len(RESTART_BACKOFF) - 1)]
        event(
            log, logging.WARNING, "serving worker died: starting a new one",
            pid=dead.pid, status=code, delay_s=delay,
        )
        if delay:
            await asyncio.sleep(delay)
        if self._stopping or self.serving is not None:
            return
        worker = self._spawn("restart")
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT)
        except (WorkerFailed, asyncio.TimeoutError) as exc:
            event(log, logging.ERROR, "replacement worker did not start", reason=str(exc))
            _kill(worker)
            if not self._stopping:
                await self._replace_dead(worker, -1)
            return
        self._make_serving(worker)

    def _make_serving(self, worker: Worker) -> None:
        worker.status = "serving"
        self.serving = worker
        if worker.channel is not None and not worker.channel.closed:
            worker.channel.send({"type": "active"})
        self._tell_foreign()
        self._release_webrtc_if_free()

    def _release_webrtc_if_free(self) -> None:
        """Give the UDP sockets of WebRTC to the serving worker once no other worker reads them."""
        serving = self.serving
        if serving is None or serving.info.get("webrtc_owner") or serving.channel is None or serving.channel.closed:
            return
        if any(w is not serving and w.info.get("webrtc_owner") for w in self.workers.values()):
            return
        serving.info["webrtc_owner"] = True
        serving.channel.send({"type": "webrtc"})

    # -- messages from workers -------------------------------------------------

    def _on_message(self, worker: Worker, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        kind = message.get("type")
        if kind == "ready":
            worker.info.update(message.get("info", {}))
            if not worker.ready.done():
                worker.ready.set_result(message)
        elif kind == "failed":
            if not worker.ready.done():
                worker.ready.set_exception(WorkerFailed(str(message.get("reason", "failed"))))
        elif kind == "released":
            worker.info["webrtc_owner"] = False
            worker.info["kept"] = []
            self._tell_foreign()
            self._release_webrtc_if_free()
        elif kind == "kept":
            worker.info["kept"] = message.get("kept", [])
            self._tell_foreign()
        elif kind == "upgrade":
            asyncio.get_running_loop().create_task(self._upgrade_request(worker, message))
        elif kind == "upgrade_keeper":
            asyncio.get_running_loop().create_task(self._reexec_request(worker, message))
        elif kind == "whip_delete":
            asyncio.get_running_loop().create_task(self._relay_whip_delete(worker, message))
        elif kind == "workers":
            worker.channel.reply(message, {"type": "workers", "keeper": self.describe()})  # type: ignore[union-attr]

    async def _relay_whip_delete(self, asker: Worker, message: dict[str, Any]) -> None:
        """A DELETE for a WHIP resource that a retiring worker still serves goes to that worker."""
        owner = next(
            (w for w in self.workers.values() if w is not asker and message.get("name") in w.info.get("kept", [])),
            None,
        )
        answer: dict[str, Any] = {"status": 404, "text": "no worker serves that WHIP resource\n"}
        if owner is not None and owner.channel is not None and not owner.channel.closed:
            try:
                reply, _ = await owner.channel.request(
                    {k: message.get(k) for k in ("type", "name", "resource", "token")}, timeout=8.0
                )
                answer = {"status": reply.get("status", 502), "text": reply.get("text", "")}
            except (ChannelClosed, asyncio.TimeoutError):
                answer = {"status": 503, "text": "the previous worker did not answer\n"}
        if asker.channel is not None and not asker.channel.closed:
            asker.channel.reply(message, answer)

    def _tell_foreign(self) -> None:
        """The serving worker refuses names another worker still publishes."""
        serving = self.serving
        if serving is None or serving.channel is None or serving.channel.closed:
            return
        names = sorted({n for w in self.workers.values() if w is not serving for n in w.info.get("kept", [])})
        serving.channel.send({"type": "foreign", "names": names})

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "started": self.started,
            "workers": [w.describe() for w in sorted(self.workers.values(), key=lambda w: w.started)],
            "upgrades": self.history[-50:],
        }

    # -- upgrade -----------------------------------------------------------------

    async def _upgrade_request(self, asker: Worker, message: dict[str, Any]) -> None:
        try:
            report = await self.upgrade(bool(message.get("dry_run")), float(message.get("drain_timeout") or 0))
        except Exception as exc:  # the asker must hear an answer, whatever broke
            log.exception("upgrade failed")
            report = {"ok": False, "action": "upgrade", "error": f"keeper error: {type(exc).__name__}: {exc}"}
        if asker.channel is not None and not asker.channel.closed:
            asker.channel.reply(message, {"type": "upgraded", "report": report})

    async def upgrade(self, dry_run: bool, drain_timeout: float) -> dict[str, Any]:
        started = time.perf_counter()
        report: dict[str, Any] = {
            "ok": False, "action": "upgrade_dry_run" if dry_run else "upgrade", "at": time.time(),
            "error": "", "old_pid": self.serving.pid if self.serving else None, "new_pid": None,
        }
        if self.upgrading:
            report["error"] = "an upgrade is already in progress: nothing changed"
            return report
        old = self.serving
        if old is None or old.channel is None or old.channel.closed:
            report["error"] = "no serving worker to upgrade from (one is being restarted)"
            return report
        self.upgrading = True
        new: Worker | None = None
        try:
            new = self._spawn("successor")
            report["new_pid"] = new.pid
            try:
                ready = await asyncio.wait_for(asyncio.shield(new.ready), START_TIMEOUT)
            except asyncio.TimeoutError:
                raise WorkerFailed(f"the new worker did not load within {START_TIMEOUT:g} s") from None
            report["new_version"] = ready.get("info", {}).get("version")
            report["new_package_version"] = ready.get("info", {}).get("package_version")
            old_end, new_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                assert new.channel is not None and old.channel is not None
                new.channel.send({"type": "handover", "side": "receive", "dry_run": dry_run}, [new_end.fileno()])
                reply = old.channel.request(
                    {"type": "handover", "side": "send", "dry_run": dry_run, "new_pid": new.pid,
                     "drain_timeout": drain_timeout},
                    [old_end.fileno()],
                    timeout=HANDOVER_TIMEOUT,
                )
            finally:
                old_end.close()
                new_end.close()
            try:
                answer, _ = await reply
            except ChannelClosed:
                raise WorkerFailed("the serving worker went away during the hand-over") from None
            except asyncio.TimeoutError:
                raise WorkerFailed(f"the hand-over did not finish within {HANDOVER_TIMEOUT:g} s") from None
            report.update(answer.get("report", {}))
            if not answer.get("ok"):
                return report
            if dry_run:
                report["ok"] = True
                return report
            if new.exited.done():
                # It took the connections and died: its streams are lost as in any
                # crash; the old worker still listens, so it goes on serving.
                report["error"] = "the new worker exited right after the hand-over"
                return report
            old.status = "retiring"
            self._make_serving(new)
            new = None  # serving now: not stopped below
            report["ok"] = True
            return report
        except WorkerFailed as exc:
            report["error"] = str(exc)
            return report
        finally:
            if new is not None:
                _kill(new, signal.SIGTERM)
            self.upgrading = False
            report["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self.history.append(report)
            event(
                log, logging.INFO if report["ok"] else logging.WARNING,
                f"{report['action']} {'done' if report['ok'] else 'refused'}",
                old_pid=report["old_pid"], new_pid=report["new_pid"], reason=report["error"] or None,
                duration_ms=report["duration_ms"],
            )

    # -- re-executing the keeper itself ---------------------------------------------

    async def _reexec_request(self, asker: Worker, message: dict[str, Any]) -> None:
        if self.upgrading:
            asker.channel.reply(message, {"type": "upgraded", "report": {  # type: ignore[union-attr]
                "ok": False, "action": "upgrade_keeper", "error": "an upgrade is in progress: nothing changed",
            }})
            return
        state = {
            "config": self.config_path, "options": self.options, "started": self.started,
            "data_dir": self.data_dir, "log": self.log_settings,
            "history": self.history[-50:],
            "listeners": [{**l.describe(), "fd": l.sock.fileno()} for l in self.listeners],
            "workers": [
                {"pid": w.pid, "role": w.role, "status": w.status, "started": w.started, "info": w.info,
                 "fd": w.channel.sock.fileno(), "serving": w is self.serving}
                for w in self.workers.values() if w.channel is not None and not w.channel.closed
            ],
            "asker": asker.pid, "request": message.get("id"),
        }
        # Let the check run first: a keeper that cannot start from the code on
        # disk now would leave the workers without a parent that listens to them.
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mediaserver", "keeper-check",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await check.communicate()
        if check.returncode != 0:
            asker.channel.reply(message, {"type": "upgraded", "report": {  # type: ignore[union-attr]
                "ok": False, "action": "upgrade_keeper",
                "error": "the keeper on disk cannot be imported: " + err.decode(errors="replace").strip()[-400:],
            }})
            return
        self._reexec = state
        self._stop.set()

    def _exec_now(self, state: dict[str, Any]) -> None:
        keep = [l["fd"] for l in state["listeners"]] + [w["fd"] for w in state["workers"]]
        for fd in keep:
            os.set_inheritable(fd, True)
        loop = asyncio.get_running_loop()
        for worker in self.workers.values():
            if worker.channel is not None:
                # Stop watching, but keep the descriptors open across exec.
                loop.remove_reader(worker.channel.sock.fileno())
                worker.channel.sock.detach()
        env = dict(os.environ)
        env[STATE_ENV] = json.dumps(state)
        event(log, logging.INFO, "keeper re-executing itself", pid=os.getpid())
        # Everything comes from the state: the config file on disk may have
        # changed since (and is read by the next worker, not by the keeper).
        os.execve(sys.executable, [sys.executable, "-m", "mediaserver", "serve"], env)

    def adopt(self, state: dict[str, Any]) -> None:
        """After a re-exec: take back the workers the previous image ran."""
        self.started = state["started"]
        self.history = state.get("history", [])
        for item in state["workers"]:
            worker = Worker(item["pid"], item["role"], None)
            worker.started = item["started"]
            worker.info = item["info"]
            worker.status = item["status"]
            worker.ready.set_result({})
            self._attach(worker, socket.socket(fileno=item["fd"]))
            if item["serving"]:
                self.serving = worker
        asker = self.workers.get(state.get("asker"))
        if asker is not None and asker.channel is not None:
            asker.channel.send({"type": "upgraded", "re": state.get("request"), "report": {
                "ok": True, "action": "upgrade_keeper", "error": "", "keeper_pid": os.getpid(),
                "workers": len(self.workers),
            }})
        self.history.append({"ok": True, "action": "upgrade_keeper", "at": time.time(), "error": ""})

    # -- running -------------------------------------------------------------------

    async def run(self, adopted: dict[str, Any] | None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        if adopted is not None:
            self.adopt(adopted)
            event(log, logging.INFO, "keeper re-executed", pid=os.getpid(), workers=len(self.workers))
        else:
            first = self._spawn("first")
            try:
                await asyncio.wait_for(asyncio.shield(first.ready), START_TIMEOUT)
            except (WorkerFailed, asyncio.TimeoutError) as exc:
                code = await self._finish(first)
                event(log, logging.ERROR, "the server did not start", reason=str(exc))
                return code or 1
            self._make_serving(first)
        await self._stop.wait()
        if self._reexec is not None:
            self._exec_now(self._reexec)
        self._stopping = True
        event(log, logging.INFO, "keeper stopping: stopping every worker")
        for worker in list(self.workers.values()):
            _kill(worker, signal.SIGTERM)
        codes = [await self._finish(w) for w in list(self.workers.values())]
        for listener in self.listeners:
            listener.sock.close()
        return 0 if all(c == 0 for c in codes) else 1

    async def _finish(self, worker: Worker) -> int:
        try:
            return await asyncio.wait_for(asyncio.shield(worker.exited), STOP_GRACE)
        except asyncio.TimeoutError:
            _kill(worker, signal.SIGKILL)
            return await worker.exited


class WorkerFailed(Exception):
    pass


def _kill(worker: Worker, sig: int = signal.SIGKILL) -> None:
    if worker.exited.done():
        return
    worker.stopped_by_keeper = True
    try:
        os.kill(worker.pid, sig)
    except ProcessLookupError:
        pass


def reexecuted_state() -> dict[str, Any] | None:
    """The state a previous keeper image handed to this one, if this is a re-exec."""
    text = os.environ.pop(STATE_ENV, None)
    return json.loads(text) if text else None


def run_reexecuted(adopted: dict[str, Any]) -> int:
    """Go on as the keeper the previous image was: its sockets, workers, config path and options."""
    from .logsetup import configure

    log_settings = adopted.get("log", {})
    configure(log_settings.get("level", "info"), log_settings.get("format", "text"))
    return run(None, adopted["config"], adopted.get("options", {}), adopted, log_settings)


def run(
    config: Config | None, config_path: str | None, options: dict[str, Any],
    adopted: dict[str, Any] | None = None, log_settings: dict[str, str] | None = None,
) -> int:
    """Bind (or take over, after a re-exec), run the workers until SIGINT/SIGTERM; the exit status."""
    if adopted is not None:
        listeners = [
            Listener(item["kind"], socket.socket(fileno=item["fd"])) for item in adopted["listeners"]
        ]
        for listener in listeners:
            os.set_inheritable(listener.sock.fileno(), False)
        for item in adopted["workers"]:
            os.set_inheritable(item["fd"], False)
    else:
        assert config is not None
        try:
            listeners = bind_listeners(config)
        except OSError as exc:
            print(f"mediaserver: cannot start: {exc.strerror or exc}", file=sys.stderr)
            return 1
    data_dir = adopted["data_dir"] if adopted is not None else str(Path(config.data_dir).resolve())  # type: ignore[union-attr]
    keeper = Keeper(config_path, options, listeners, data_dir)
    keeper.log_settings = log_settings or {}
    return asyncio.run(keeper.run(adopted))
