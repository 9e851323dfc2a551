"""Settings come from flags, then the environment, then the file, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.config import ConfigError, load_settings


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    (tmp_path / "federation.toml").write_text(
        "log_level = 'DEBUG'\n[gateway]\nhttp_port = 7000\nmax_body_bytes = 10\n"
    )
    env = {"FEDERATION_HOME": str(tmp_path), "FEDERATION_GATEWAY_HTTP_PORT": "7100"}
    settings = load_settings({"gateway.http_port": 7200}, env)
    assert settings.gateway.http_port == 7200
    assert load_settings({}, env).gateway.http_port == 7100
    assert settings.gateway.max_body_bytes == 10
    assert settings.log_level == "DEBUG"
    assert settings.home == tmp_path


def test_database_url_short_form(tmp_path: Path) -> None:
    env = {"FEDERATION_HOME": str(tmp_path), "FEDERATION_DATABASE_URL": "postgresql://x/y"}
    assert load_settings({}, env).database.url == "postgresql://x/y"


def test_defaults_without_anything() -> None:
    settings = load_settings({}, {})
    assert settings.home == Path(".federation")
    assert settings.gateway.http_port == 8080
    assert settings.grpc.max_message_bytes == 4 * 1024 * 1024


def test_bad_values_and_unknown_keys_are_clear_errors(tmp_path: Path) -> None:
    env = {"FEDERATION_HOME": str(tmp_path), "FEDERATION_GATEWAY_HTTP_PORT": "eighty"}
    with pytest.raises(ConfigError, match=r"gateway\.http_port"):
        load_settings({}, env)
    (tmp_path / "federation.toml").write_text("[gateway]\nhttp_prot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting .gateway\.http_prot."):
        load_settings({}, {"FEDERATION_HOME": str(tmp_path)})
    (tmp_path / "federation.toml").write_text("[gateway\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, {"FEDERATION_HOME": str(tmp_path)})


def _load_toml(home: Path, text: str) -> None:
    (home / "federation.toml").write_text(text)
    load_settings({}, {"FEDERATION_HOME": str(home)})


@pytest.mark.parametrize(("text", "setting"), [
    ("[gateway]\nhttp_port = 8080.7\n", "gateway.http_port"),
    ("[gateway]\nmax_body_bytes = true\n", "gateway.max_body_bytes"),
    ("[database]\nmigrate = 0\n", "database.migrate"),
    ("[peers]\nkeys = ['a:1', 'b:2']\n", "peers.keys"),
    ("[gateway]\nhttp_host = 1979-05-27\n", "gateway.http_host"),
    ("[grpc]\ncall_timeout_seconds = false\n", "grpc.call_timeout_seconds"),
])
def test_toml_values_of_the_wrong_type_are_refused(tmp_path: Path, text: str,
                                                   setting: str) -> None:
    """A TOML value is never converted: ``8080.7`` is not a port, ``true`` not a size."""
    with pytest.raises(ConfigError, match=rf"setting {setting}: cannot use"):
        _load_toml(tmp_path, text)


def test_toml_values_of_the_right_type_still_load(tmp_path: Path) -> None:
    (tmp_path / "federation.toml").write_text(
        "[grpc]\ncall_timeout_seconds = 7\n[database]\nmigrate = false\n")
    settings = load_settings({}, {"FEDERATION_HOME": str(tmp_path)})
    assert settings.grpc.call_timeout_seconds == 7.0
    assert settings.database.migrate is False


@pytest.mark.parametrize(("text", "message"), [
    ("home = '/elsewhere'\n", "home cannot be set in the file"),
    ("gateway = 5\n", r"setting gateway is a section"),
])
def test_settings_the_file_cannot_hold_are_refused(tmp_path: Path, text: str,
                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load_toml(tmp_path, text)


def test_a_file_that_is_not_utf8_or_not_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "federation.toml").write_bytes(b'[gateway]\nhttp_host = "\xff"\n')
    with pytest.raises(ConfigError, match=r"federation\.toml: not valid TOML"):
        load_settings({}, {"FEDERATION_HOME": str(tmp_path)})
    (tmp_path / "federation.toml").unlink()
    (tmp_path / "federation.toml").mkdir()
    with pytest.raises(ConfigError, match=r"federation\.toml: not a regular file"):
        load_settings({}, {"FEDERATION_HOME": str(tmp_path)})


def test_errors_in_a_list_of_tables_name_the_table(tmp_path: Path) -> None:
    text = "[[inference.models]]\nid = 'a'\n[[inference.models]]\nid = 'b'\nbackend = 1\n"
    with pytest.raises(ConfigError, match=r"setting inference\.models\[1\]\.backend: cannot"):
        _load_toml(tmp_path, text)
    text = "[[inference.models]]\nid = 'a'\ngguf_pth = 'x'\n"
    with pytest.raises(ConfigError, match=r"unknown setting 'inference\.models\[0\]\.gguf_pth'"):
        _load_toml(tmp_path, text)
    env = {"FEDERATION_HOME": str(tmp_path),
           "FEDERATION_INFERENCE_MODELS": '[{"id": "t", "backend": "test"}]'}
    (tmp_path / "federation.toml").unlink()
    assert load_settings({}, env).inference.models[0].backend == "test"


def test_an_empty_home_is_an_error_not_the_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="setting home: empty"):
        load_settings({"home": ""}, {"FEDERATION_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="setting home: empty"):
        load_settings({}, {"FEDERATION_HOME": ""})
    assert load_settings({"home": str(tmp_path)}, {"FEDERATION_HOME": ""}).home == tmp_path


def test_an_empty_database_url_in_the_environment_beats_the_file(tmp_path: Path) -> None:
    """Empty means embedded; the environment wins over the file, as the flag does."""
    (tmp_path / "federation.toml").write_text("[database]\nurl = 'postgresql://db1/x'\n")
    env = {"FEDERATION_HOME": str(tmp_path), "FEDERATION_DATABASE_URL": ""}
    assert load_settings({}, env).database.url == ""
    assert load_settings({"database.url": ""}, env).database.url == ""


def test_a_misspelt_variable_of_a_section_is_an_error(tmp_path: Path) -> None:
    env = {"FEDERATION_HOME": str(tmp_path), "FEDERATION_GATEWAY_HTTP_PROT": "9000"}
    with pytest.raises(ConfigError, match=r"unknown setting gateway\.http_prot \(environment "
                                          r"variable FEDERATION_GATEWAY_HTTP_PROT\)"):
        load_settings({}, env)
    # Names outside every section's namespace are not ours to judge.
    env = {"FEDERATION_HOME": str(tmp_path), "FEDERATION_KEY": "sk-…",
           "FEDERATION_TEST_DATABASE_URL": "postgresql://x/y"}
    assert load_settings({}, env).home == tmp_path
