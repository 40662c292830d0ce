from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.settings import load_settings


def test_defaults_work_with_no_file() -> None:
    s = load_settings(None, environ={})
    assert s.broker.mode == "embedded" and (s.broker.host, s.broker.port) == ("127.0.0.1", 1883)
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8080)
    assert s.state_dir == Path(".appliance") and s.device_id
    assert s.ingest.max_frame_bytes == 8 * 1024 * 1024


def test_file_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('device_id = "mine-7"\n[broker]\nmode = "external"\nhost = "10.0.0.2"\nport = 8883\n')
    s = load_settings(f, environ={"APPLIANCE_BROKER__PORT": "1884", "APPLIANCE_HTTP__HOST": "0.0.0.0"})
    assert s.device_id == "mine-7" and s.broker.host == "10.0.0.2"
    assert s.broker.port == 1884 and s.http.host == "0.0.0.0"
    assert s.broker.mqtt_version == "5"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    f = tmp_path / "site.toml"
    f.write_text("[broker]\nprot = 1884\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f, environ={})
    assert "broker.prot" in str(e.value) and str(f) in str(e.value) and "unknown key" in str(e.value)


def test_invalid_value_from_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, environ={"APPLIANCE_HTTP__PORT": "eighty"})
    assert "APPLIANCE_HTTP__PORT" in str(e.value) and "http.port" in str(e.value)


def test_embedded_broker_refuses_non_loopback(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text('[broker]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="loopback"):
        load_settings(f, environ={})


def test_bad_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    f = tmp_path / "a.toml"
    f.write_text("[broker\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(f, environ={})
