"""The command line and the config file: bad config fails fast and says which key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import free_ports, merge, server_command, server_env, to_toml


def _run(args: list[str], cwd, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            args, cwd=cwd, env=server_env(), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{args} still running after {timeout}s (a bad config must fail at start); "
            f"stderr so far: {exc.stderr!r}"
        ) from None


def _valid_config(tmp_path) -> dict:
    rtmp, http, admin = free_ports(3)
    return {
        "data_dir": str(tmp_path / "data"),
        "log_level": "info",
        "rtmp": {"host": "127.0.0.1", "port": rtmp},
        "http": {"host": "127.0.0.1", "port": http},
        "admin": {"host": "127.0.0.1", "port": admin},
    }


BAD_CONFIGS = [
    # (id, override merged into a valid config, key the message must name)
    ("unknown-top-level-key", {"bogus_option": 1}, "bogus_option"),
    ("unknown-section", {"frobnicate": {"x": 1}}, "frobnicate"),
    ("unknown-key-in-section", {"hls": {"segment_targett": 2.0}}, "segment_targett"),
    ("wrong-type-port", {"rtmp": {"port": "1935"}}, "port"),
    ("wrong-type-string-for-float", {"hls": {"segment_target": "two"}}, "segment_target"),
    ("wrong-type-string-for-int", {"hls": {"playlist_size": "6"}}, "playlist_size"),
    ("wrong-type-handshake-timeout", {"rtmp": {"handshake_timeout": "soon"}}, "handshake_timeout"),
    ("wrong-type-log-level", {"log_level": 3}, "log_level"),
    ("bad-enum", {"publish": {"on_conflict": "fight"}}, "on_conflict"),
    ("section-is-not-a-table", {"hls": 5}, "hls"),
    ("webrtc-port-range-reversed", {"webrtc": {"port_min": 5000, "port_max": 4000}}, "port_max"),
    ("webrtc-one-port-and-a-range", {"webrtc": {"udp_port": 8189, "port_min": 40000, "port_max": 40010}}, "udp_port"),
]


@pytest.mark.parametrize("override,key", [b[1:] for b in BAD_CONFIGS], ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_exits_nonzero_naming_the_key(tmp_path, override, key):
    config = _valid_config(tmp_path)
    if not isinstance(override.get("hls", {}), dict):
        config.update(override)
    else:
        config = merge(config, override)
    text = to_toml(config)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = _run(server_command(path), tmp_path)
    assert proc.returncode != 0, f"exited 0 with a bad config:\n{text}\nstderr:\n{proc.stderr}"
    assert key in proc.stderr, f"the error does not name `{key}`:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, f"a bad config should be a message, not a traceback:\n{proc.stderr}"


def test_missing_config_file_fails(tmp_path):
    proc = _run(server_command(tmp_path / "nope.toml"), tmp_path)
    assert proc.returncode != 0
    assert "nope.toml" in proc.stderr, proc.stderr


def test_invalid_toml_fails(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[rtmp\nport = \n")
    proc = _run(server_command(path), tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip(), "no message for a file that is not TOML"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_serve_help(tmp_path):
    proc = _run([sys.executable, "-m", "mediaserver", "serve", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout


def test_top_level_help(tmp_path):
    proc = _run([sys.executable, "-m", "mediaserver", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout


def test_valid_config_serves_then_sigterm_exits_0(server):
    assert server.alive()
    assert server.stop() == 0, server.log_tail()


def test_webrtc_udp_port_in_use_is_a_message(tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        config = merge(_valid_config(tmp_path), {"webrtc": {"host_addresses": ["127.0.0.1"], "udp_port": port}})
        path = tmp_path / "busy.toml"
        path.write_text(to_toml(config))
        proc = _run(server_command(path), tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"webrtc.udp_port: cannot bind UDP 127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
