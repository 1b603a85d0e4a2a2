"""The relup engine: apply, dry-run and revert upgrades of the running logic.

A relup is a transaction. Preflight loads the new generation (off the hot
path: one file per loop turn), checks versions before any code runs,
migrates a copy of every live session's state, validates it strictly against
the new struct, proves `down(up(s)) == s`, and replays each session's last
messages through the new handler on that copy without executing effects.
Only then are sessions switched: the live states are migrated in one
synchronous pass, all results computed before any is installed, so no
message is handled while some sessions run old code and others new. Any
failure changes nothing. `revert` goes back to the previous generation,
still in memory, with the down migrations.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgspec

from ..config import RelupConfig
from ..logsetup import event
from .generation import Generation, GenerationError, load_generation_async, purge, read_version
from .relup_paths import RelupPathError, check_package_tree, resolve_package
from .relup_spec import RelupSpec, RelupSpecError, read_spec
from .session import Session
from .streams import Streams

log = logging.getLogger("mediaserver.relup")
MIGRATIONS_MODULE = "_relup_migrations"
PREFLIGHT_CHUNK = 10
"""Sessions checked per event-loop turn during preflight."""

Migration = Callable[[dict[str, Any]], dict[str, Any]]


class SessionError(msgspec.Struct):
    stream: str
    stage: str
    reason: str


class SessionResult(msgspec.Struct):
    """What preflight found for one live session (every session, ok or not)."""

    stream: str
    ok: bool
    detail: str


class RelupReport(msgspec.Struct):
    ok: bool
    action: str
    """apply, dry_run, revert or auto_revert."""
    from_version: str
    to_version: str
    sessions: int = 0
    duration_ms: float = 0.0
    switch_ms: float = 0.0
    """How long the synchronous switch pass held the event loop."""
    error: str = ""
    session_errors: list[SessionError] = []
    session_results: list[SessionResult] = []
    rehandled: int = 0
    """Quarantined messages handed back to the generation reverted to."""
    at: float = 0.0


class RelupFailed(Exception):
    def __init__(self, report: RelupReport) -> None:
        super().__init__(report.error)
        self.report = report


@dataclass(eq=False)
class Applied:
    spec: RelupSpec
    package: Path
    previous: Generation
    generation: Generation
    up: Migration
    down: Migration
    applied_at: float
    crashes: int = 0


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class CodeServer:
    """Owns which generation is current, the applied relups, and the history."""

    def __init__(self, config: RelupConfig, streams: Streams, initial: Generation) -> None:
        self.config = config
        self.streams = streams
        self.current = initial
        self.applied: list[Applied] = []
        self.history: list[RelupReport] = []
        self.lock = asyncio.Lock()
        """One lock for apply, revert and auto-revert."""
        self.report_listeners: list[Callable[[RelupReport], None]] = []
        self.busy_reason = ""
        """Why apply and revert are refused now (an upgrade is moving the sessions); "" when not."""
        self.counts: dict[str, int] = {}
        """(action, ok|refused) -> how many, for metrics; history itself is capped."""
        streams.crash_listeners.append(self._on_crash)
        streams.revertible = self._revertible
        self._warn_if_the_supervisor_wins(streams.config.supervisor.max_restarts)

    def _warn_if_the_supervisor_wins(self, max_restarts: int) -> None:
        # The crash that reaches auto_revert_crashes reverts before the intensity
        # check, and a session's crashes are at most the generation's: the revert
        # wins while auto_revert_crashes <= max_restarts + 1.
        if self.config.auto_revert_crashes > max_restarts + 1:
            event(
                log, logging.WARNING,
                "relup.auto_revert_crashes is above supervisor.max_restarts + 1: a crashing relup "
                "can stop a session before it is reverted",
                auto_revert_crashes=self.config.auto_revert_crashes, max_restarts=max_restarts,
            )

    @property
    def relups_dir(self) -> Path:
        return Path(self.config.directory)

    def generations(self) -> list[Generation]:
        kept = [a.previous for a in self.applied]
        return [*kept, self.current]

    # -- apply -----------------------------------------------------------------

    async def apply(self, requested: str | None, dry_run: bool = False) -> RelupReport:
        async with self.lock:
            return await self._apply(requested, dry_run)

    async def _apply(self, requested: str | None, dry_run: bool) -> RelupReport:
        started = time.perf_counter()
        action = "dry_run" if dry_run else "apply"
        from_version = self.current.version
        base = self.current
        report = RelupReport(
            False, action, from_version, "?", sessions=self._live_count(), at=time.time()
        )
        generation: Generation | None = None
        try:
            if self.busy_reason:
                raise RelupSpecError(f"{self.busy_reason}: nothing changed; apply again afterwards")
            package = self._find_package(requested)
            check_package_tree(package)  # before reading anything in it
            spec = read_spec(package / "relup.toml")
            report.to_version = spec.to_version
            # The version check comes before any code of the package runs.
            if package.name != spec.to_version:
                raise RelupSpecError(
                    f"relup directory {package.name} says to = {spec.to_version}: "
                    "the directory must be named after the version it upgrades to"
                )
            if spec.from_version != from_version:
                raise RelupSpecError(
                    f"relup {package.name} upgrades from {spec.from_version}, "
                    f"but the running version is {from_version}"
                )
            logic_dir = (package / spec.load.path).resolve()
            if package not in logic_dir.parents:
                raise RelupPathError(
                    f"load_logic path {spec.load.path!r} leaves the relup package {package.name}"
                )
            migrations = package / "migrations.py"
            if not logic_dir.is_dir():
                raise RelupSpecError(f"relup {package.name} has no {spec.load.path}/ directory")
            declared = read_version(logic_dir)  # from the AST: nothing runs
            if declared != spec.to_version:
                raise RelupSpecError(
                    f"relup {package.name} says to = {spec.to_version}, "
                    f"but its logic has VERSION = {declared}"
                )
            extra = {MIGRATIONS_MODULE: migrations} if spec.updates else {}
            generation = await load_generation_async(logic_dir, extra)
            if generation.version != spec.to_version:
                raise RelupSpecError(
                    f"relup {package.name} says to = {spec.to_version}, "
                    f"but its logic has VERSION = {generation.version}"
                )
            up, down = self._migrations(generation, spec)
            sessions = self.streams.sessions()
            report.sessions = len(sessions)
            errors, results = await self._preflight(sessions, generation, up, down)
            report.session_results = results
            if errors:
                report.session_errors = errors
                raise RelupSpecError(
                    f"preflight failed for {len(errors)} session(s); first: "
                    f"{errors[0].stream} at {errors[0].stage}: {errors[0].reason}"
                )
            if dry_run:
                report.ok = True
                return report
            if self.current is not base:
                raise RelupSpecError(
                    f"the running generation changed during preflight (now {self.current.version}, "
                    "an automatic revert): nothing switched; apply again"
                )
            report.switch_ms, report.sessions = self._switch(generation, up, down, self.current)
            self.applied.append(
                Applied(spec, package, self.current, generation, up, down, time.monotonic())
            )
            self.current = generation
            self.streams.generation = generation
            generation = None  # installed: not purged below
            report.ok = True
            return report
        except (RelupPathError, RelupSpecError, GenerationError, _SwitchAborted, ValueError, OSError) as exc:
            report.error = str(exc) if not isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, _SwitchAborted):
                report.session_errors = exc.errors
            return report
        finally:
            if generation is not None:
                purge(generation)
            report.duration_ms = round((time.perf_counter() - started) * 1000, 3)
            self._record(report)

    def _find_package(self, requested: str | None) -> Path:
        if requested:
            return resolve_package(self.relups_dir, requested)
        # No path: the package whose `from` is the running version.
        root = self.relups_dir
        if not root.is_dir():
            raise RelupPathError(f"relups directory {root} does not exist")
        matches = []
        for child in sorted(root.iterdir()):
            spec_path = child / "relup.toml"
            if child.is_dir() and not child.is_symlink() and spec_path.is_file():
                try:
                    if read_spec(spec_path).from_version == self.current.version:
                        matches.append(child.name)
                except RelupSpecError:
                    continue
        if len(matches) != 1:
            found = ", ".join(matches) or "none"
            raise RelupSpecError(
                f"no single relup upgrades from {self.current.version} in {root} (found: {found}); "
                "name one"
            )
        return resolve_package(root, matches[0])

    @staticmethod
    def _migrations(generation: Generation, spec: RelupSpec) -> tuple[Migration, Migration]:
        if not spec.updates:
            return (lambda state: state), (lambda state: state)
        module = __import__(f"{generation.package_name}.{MIGRATIONS_MODULE}", fromlist=["_"])
        update = spec.updates[0]
        up, down = getattr(module, update.up, None), getattr(module, update.down, None)
        if not callable(up) or not callable(down):
            raise RelupSpecError(
                f"migrations.py must define {update.up}(state) and {update.down}(state)"
            )
        return up, down

    async def _preflight(
        self, sessions: list[Session], generation: Generation, up: Migration, down: Migration
    ) -> tuple[list[SessionError], list[SessionResult]]:
        errors: list[SessionError] = []
        results: list[SessionResult] = []
        for index, session in enumerate(sessions):
            if index and index % PREFLIGHT_CHUNK == 0:
                await asyncio.sleep(0)
            if session.stopped:
                continue
            old_generation = session.generation
            stage = "up migration"
            try:
                migrated = _migrate(session.state, up, generation.state_type)
                stage = "down migration (revert proof)"
                back = _migrate(migrated, down, old_generation.state_type)
                if back != session.state:
                    raise ValueError(
                        "down(up(state)) differs from the state in "
                        + state_diff(msgspec.to_builtins(session.state), msgspec.to_builtins(back))
                    )
                stage = "replay of recent messages"
                state = migrated
                replayed = list(session.recent)
                for message in replayed:
                    state, _ = generation.handle(state, message)
                results.append(SessionResult(
                    session.name, True,
                    f"up migration valid, down(up(state)) == state, {len(replayed)} recent messages replayed",
                ))
            except BaseException as exc:  # user code can raise anything
                errors.append(SessionError(session.name, stage, _text(exc)))
                results.append(SessionResult(session.name, False, f"{stage}: {_text(exc)}"))
        return errors, results

    def _switch(
        self, generation: Generation, up: Migration, down: Migration, expected: Generation
    ) -> tuple[float, int]:
        """Migrate every live state and pin every session, synchronously; all or nothing.

        The cyclic collector is held off for the pass (it is the one stretch that
        must not be interrupted); it runs again at its next natural trigger.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._switch_all(generation, up, expected)
        finally:
            if collecting:
                gc.enable()

    def _switch_all(
        self, generation: Generation, up: Migration, expected: Generation, back_from: Generation | None = None
    ) -> tuple[float, int]:
        started = time.perf_counter()
        results: list[tuple[Session, Any]] = []
        errors: list[SessionError] = []
        for session in self.streams.sessions():
            if session.stopped:
                continue
            try:
                if session.generation is not expected:
                    raise ValueError(
                        f"session runs generation {session.generation.number}, "
                        f"not {expected.number}"
                    )
                results.append((session, _migrate(session.state, up, generation.state_type)))
            except BaseException as exc:
                errors.append(SessionError(session.name, "switch migration", _text(exc)))
        if errors:
            raise _SwitchAborted(errors)
        for session, state in results:
            if back_from is None:
                session.release_held()  # moving on: what the old generation failed stays failed
                session.change_code(generation, state)
            else:
                session.return_to(generation, state, back_from)
        return round((time.perf_counter() - started) * 1000, 3), len(results)

    # -- revert ----------------------------------------------------------------

    async def revert(self, reason: str = "operator request", action: str = "revert") -> RelupReport:
        if self.busy_reason and action == "revert":
            report = RelupReport(False, action, self.current.version, "?", sessions=self._live_count(), at=time.time())
            report.error = f"{self.busy_reason}: nothing changed; revert again afterwards"
            self._record(report)
            return report
        async with self.lock:
            return self._revert_now(reason, action)

    def _revert_now(self, reason: str, action: str) -> RelupReport:
        """The revert itself, synchronous: the previous generation is still loaded.

        The automatic revert calls this from the crash report itself, so the
        sessions of the failing generation are moved back before another of
        their messages is handled. Every switch is one synchronous pass, so this
        cannot interleave with another; an apply whose preflight was overtaken
        by it is refused at its switch.
        """
        started = time.perf_counter()
        report = RelupReport(
            False, action, self.current.version, "?", sessions=self._live_count(), at=time.time()
        )
        try:
            if not self.applied:
                raise RelupSpecError(f"nothing to revert: {self.current.version} is the base version")
            top = self.applied[-1]
            report.to_version = top.previous.version
            report.switch_ms, _, report.rehandled = self._switch_back(top)
            self.applied.pop()
            self.current = top.previous
            self.streams.generation = top.previous
            purge(top.generation)
            report.ok = True
            event(
                log, logging.WARNING, "relup reverted", version=self.current.version, reason=reason,
                rehandled=report.rehandled,
            )
        except (RelupSpecError, _SwitchAborted) as exc:
            report.error = str(exc)
            if isinstance(exc, _SwitchAborted):
                report.session_errors = exc.errors
        report.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self._record(report)
        return report

    def _switch_back(self, top: Applied) -> tuple[float, int, int]:
        collecting = gc.isenabled()
        gc.disable()
        try:
            switch_ms, moved = self._switch_all(top.previous, top.down, top.generation, back_from=top.generation)
        finally:
            if collecting:
                gc.enable()
        rehandled = 0
        for session in self.streams.sessions():
            if session.mailbox and session.generation is top.previous:
                rehandled += session._front
                self._drain_soon(session)
        return switch_ms, moved, rehandled

    @staticmethod
    def _drain_soon(session: Session) -> None:
        """Handle what the revert put back, after the current message (never inside it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            session.drain()
        else:
            loop.call_soon(session.drain)

    def _revertible(self, generation: Generation) -> bool:
        return bool(self.applied) and generation is self.applied[-1].generation

    def _live_count(self) -> int:
        return sum(1 for session in self.streams.sessions() if not session.stopped)

    def _on_crash(self, session: Session) -> None:
        if not self.applied or session.generation is not self.applied[-1].generation:
            return
        top = self.applied[-1]
        if time.monotonic() - top.applied_at > self.config.auto_revert_window:
            return
        top.crashes += 1
        if top.crashes >= self.config.auto_revert_crashes:
            reason = (
                f"{top.crashes} handler crashes on {top.generation.version} within "
                f"{self.config.auto_revert_window:g} s of its relup"
            )
            event(log, logging.ERROR, "automatic revert", version=top.generation.version, reason=reason)
            self._revert_now(reason, "auto_revert")

    # -- reporting -------------------------------------------------------------

    def _record(self, report: RelupReport) -> None:
        self.history.append(report)
        del self.history[:-100]
        key = f"{report.action}:{'ok' if report.ok else 'refused'}"
        self.counts[key] = self.counts.get(key, 0) + 1
        for listener in list(self.report_listeners):
            listener(report)
        level = logging.INFO if report.ok else logging.ERROR
        event(
            log, level, f"relup {report.action} {'done' if report.ok else 'refused'}",
            from_version=report.from_version, to_version=report.to_version,
            sessions=report.sessions, switch_ms=report.switch_ms,
            duration_ms=report.duration_ms, reason=report.error or None,
        )

    def status(self) -> dict[str, Any]:
        pinned: dict[int, int] = {}
        for session in self.streams.sessions():
            pinned[session.generation.number] = pinned.get(session.generation.number, 0) + 1
        return {
            "version": self.current.version,
            "generations": [
                {
                    "number": g.number,
                    "version": g.version,
                    "state_version": g.state_version,
                    "sessions": pinned.get(g.number, 0),
                    "current": g is self.current,
                    "kept_for_revert": g is not self.current,
                }
                for g in self.generations()
            ],
            "sessions": self.streams.describe(),
            "history": msgspec.to_builtins(self.history),
        }


class _SwitchAborted(Exception):
    def __init__(self, errors: list[SessionError]) -> None:
        first = errors[0]
        super().__init__(
            f"switch aborted, nothing changed: {first.stream} at {first.stage}: {first.reason}"
        )
        self.errors = errors


def _migrate(state: Any, migration: Migration, target: type) -> Any:
    """`migration` on the builtin form of `state`, validated strictly as `target`."""
    # to_builtins builds a fresh structure: the migration may change it freely.
    result = migration(msgspec.to_builtins(state))
    if not isinstance(result, dict):
        raise TypeError(f"migration returned {type(result).__name__}, not dict")
    return msgspec.convert(result, target)


def state_diff(before: Any, after: Any, path: str = "") -> str:
    """The fields where `after` differs from `before`, with both values."""
    if isinstance(before, dict) and isinstance(after, dict):
        parts = []
        for key in list(before) + [k for k in after if k not in before]:
            where = f"{path}.{key}" if path else str(key)
            if key not in after:
                parts.append(f"{where} (was {_short(before[key])}, now missing)")
            elif key not in before:
                parts.append(f"{where} (was missing, now {_short(after[key])})")
            elif before[key] != after[key]:
                parts.append(state_diff(before[key], after[key], where))
        return ", ".join(parts)
    return f"{path or 'state'} (was {_short(before)}, now {_short(after)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
