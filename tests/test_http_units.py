"""The HTTP side's pieces with real files and real log records: safe reads, the log rate limiter."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mediaserver.logsetup import RateLimitFilter
from mediaserver.transport.safe_files import open_regular, read_regular


def test_read_regular_serves_only_regular_files_reached_without_links(tmp_path: Path) -> None:
    stream = tmp_path / "hls" / "cam"
    stream.mkdir(parents=True)
    (stream / "index.m3u8").write_bytes(b"#EXTM3U\n")
    outside = tmp_path / "secret"
    outside.write_bytes(b"SECRET")
    (stream / "link.ts").symlink_to(outside)
    (stream / "dangling.ts").symlink_to(tmp_path / "nowhere")
    os.mkfifo(stream / "fifo.ts")
    (stream / "dir.ts").mkdir()
    (tmp_path / "hls" / "linked").symlink_to(stream)
    assert read_regular(stream, "index.m3u8") == b"#EXTM3U\n"
    for name in ("link.ts", "dangling.ts", "fifo.ts", "dir.ts", "missing.ts"):
        t0 = time.monotonic()
        assert read_regular(stream, name) is None, name
        assert time.monotonic() - t0 < 0.1, name  # a FIFO is never opened, so never waited on
    # The stream directory itself as a link: refused even though the file inside is regular.
    assert read_regular(tmp_path / "hls" / "linked", "index.m3u8") is None
    assert read_regular(tmp_path / "hls" / "nosuch", "index.m3u8") is None
    opened = open_regular(stream, "index.m3u8")
    assert opened is not None
    os.close(opened[0])


def _record(msg: str, created: float, name: str = "mediaserver.http") -> logging.LogRecord:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (), None)
    record.created = created
    return record


def test_rate_limit_filter_keeps_n_per_second_and_counts_the_rest() -> None:
    limiter = RateLimitFilter(per_second=3)
    passed = [r for r in (_record("HTTP connection refused", 100.0 + i * 0.01) for i in range(50)) if limiter.filter(r)]
    assert len(passed) == 3
    later = _record("HTTP connection refused", 101.5)
    assert limiter.filter(later)
    assert later.fields == {"suppressed": 47}
    # Another message has its own budget; other loggers are not limited at all.
    assert limiter.filter(_record("bad HTTP request refused", 100.2))
    assert all(limiter.filter(_record("publish started", 100.0, "mediaserver.streams")) for _ in range(50))
    error = _record("HTTP connection refused", 101.6)
    error.levelno = logging.ERROR
    assert all(limiter.filter(error) for _ in range(10))
