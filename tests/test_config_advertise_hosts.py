"""`webrtc.advertise_hosts` takes literal IP addresses only: a typo or a
Unicode digit ('²') is a clear start-up error, not an SDP candidate."""

from __future__ import annotations

import pytest

from mediaserver.config import ConfigError, load_config


def _write(tmp_path, hosts: str):
    path = tmp_path / "c.toml"
    path.write_text(f"[webrtc]\nadvertise_hosts = {hosts}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad", ["192.0.2.²", "1.2.3", "example.com", "", "10.0.0.1 "])
def test_advertise_hosts_refuses_what_is_not_an_address(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"advertise_hosts.*not an IPv4 or IPv6 address"):
        load_config(_write(tmp_path, f'["{bad}"]'))


def test_advertise_hosts_takes_ipv4_and_ipv6(tmp_path):
    config = load_config(_write(tmp_path, '["203.0.113.7", "2001:db8::1"]'))
    assert config.webrtc.advertise_hosts == ["203.0.113.7", "2001:db8::1"]
