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


def test_a_typo_in_a_sites_sample_override_stops_the_start_naming_key_and_file(tmp_path: Path) -> None:
    """`per_mintue = 5` would otherwise load, then break the app's first result and with it every alert."""
    f = tmp_path / "site.toml"
    f.write_text("[samples.apps.ppe-watch]\nper_mintue = 5\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f, environ={})
    assert "samples.apps.ppe-watch.per_mintue" in str(e.value) and str(f) in str(e.value)
    assert "unknown key" in str(e.value)
    f.write_text("[samples.apps.ppe-watch]\nnear_threshold = 2\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f, environ={})
    assert "samples.apps.ppe-watch.near_threshold" in str(e.value) and "less than or equal to 1" in str(e.value)


def test_a_sites_sample_override_changes_only_the_keys_it_sets(tmp_path: Path) -> None:
    from formats.app_manifest import SamplePolicy

    f = tmp_path / "site.toml"
    f.write_text('[samples.apps.ppe-watch]\nper_minute = 5\nclasses = ["forklift"]\n')
    override = load_settings(f, environ={}).samples.apps["ppe-watch"]
    policy = SamplePolicy(near_threshold=0.1).overridden(override)
    assert (policy.per_minute, policy.classes, policy.near_threshold, policy.per_hour) == (5, ["forklift"], 0.1, 60)
    assert set(type(override).model_fields) == set(SamplePolicy.model_fields), "every policy key can be overridden"
