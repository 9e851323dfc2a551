"""Settings are checked when loaded: each value in its range, limits that must agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from federation.config import ConfigError, load_settings


def _load(home: Path, toml: str, **env: str) -> None:
    (home / "federation.toml").write_text(toml)
    load_settings({}, {"FEDERATION_HOME": str(home), **env})


@pytest.mark.parametrize(("toml", "message"), [
    ("[grpc]\nmax_message_bytes = -1\n", r"setting grpc\.max_message_bytes: must be at least 1"),
    ("[grpc]\ncall_timeout_seconds = 0\n", r"setting grpc\.call_timeout_seconds: must be more"),
    ("[gateway]\nrequest_timeout_seconds = -5.0\n", r"gateway\.request_timeout_seconds"),
    ("[gateway]\nrequest_timeout_seconds = nan\n", r"request_timeout_seconds: must be a finite"),
    ("[gateway]\nhttp_port = 70000\n", r"setting gateway\.http_port: 70000 is not a port"),
    ("[database]\npool_max_size = 0\n", r"setting database\.pool_max_size: must be at least 1"),
    ("[memory]\nmax_batch = 0\n", r"setting memory\.max_batch"),
    ("[pki]\nleaf_validity_days = 0\n", r"setting pki\.leaf_validity_days: must be more than 0"),
    ("log_level = 'verbose'\n", r"setting log_level: must be one of"),
    ("[gateway]\ntls = 'yes'\n", r"setting gateway\.tls: must be one of off, federation, files"),
    ("[council]\nrounds = 3\n", r"setting council\.rounds"),
    ("[tracing]\nsample_ratio = 1.5\n", r"setting tracing\.sample_ratio: must be between"),
    ("[keys]\nlease_max_fraction = -0.1\n", r"setting keys\.lease_max_fraction"),
    ("[backup]\nscrypt_log2_n = 30\n", r"setting backup\.scrypt_log2_n"),
    ("[[inference.models]]\nbackend = 'lamacpp'\n", r"inference\.models\[0\]\.backend: must be"),
    ("[[inference.models]]\ncontext_length = 0\n", r"inference\.models\[0\]\.context_length"),
])
def test_values_out_of_range_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, toml)


@pytest.mark.parametrize(("toml", "message"), [
    ("[database]\npool_min_size = 20\npool_max_size = 2\n",
     r"database\.pool_min_size \(20\) must be at most database\.pool_max_size \(2\)"),
    ("[database]\nconnect_timeout_seconds = 30\n",
     r"database\.connect_timeout_seconds \(30\.0\) must be at most database\.acquire"),
    ("[council]\nmember_deadline_seconds = 400\n", r"council\.member_deadline_seconds"),
    ("[keys]\ninitial_strength = 20\n", r"keys\.minimum_strength \(25\.0\) must be at most"),
    ("[gateway]\nroute_first_event_timeout_seconds = 600\n",
     r"route_first_event_timeout_seconds \(600\.0\) must be at most gateway\.request_timeout"),
    ("[keys]\nunsettled_reservation_seconds = 60\n",
     r"keys\.unsettled_reservation_seconds \(60\.0\) must be more than gateway\.request"),
    ("[pki]\nrenew_within_days = 30\n", r"pki\.renew_within_days \(30\.0\) must be less than"),
    ("[gateway]\nmax_body_bytes = 8388608\n",
     r"gateway\.max_body_bytes \(8388608\) must leave 65536 bytes under grpc\.max_message"),
    ("[edge]\nchunk_max_bytes = 8388608\n", r"edge\.chunk_max_bytes \(8388608\) must leave"),
    ("[grpc]\nmax_message_bytes = 1048576\n", r"must leave 65536 bytes under grpc\.max_message"),
])
def test_limits_that_disagree_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, toml)


def test_values_in_range_load(tmp_path: Path) -> None:
    """Zero where it means something (no watchdog, no grace, a free port), a raised
    gRPC limit with the sizes under it, and a lower-case log level."""
    _load(tmp_path, "log_level = 'debug'\n[inference]\nstall_timeout_seconds = 0\n"
          "[grpc]\ngrace_seconds = 0\nmax_message_bytes = 16777216\n"
          "[gateway]\nhttp_port = 0\nmax_body_bytes = 8388608\n"
          "[edge]\nchunk_max_bytes = 8388608\nrevocation_cache_seconds = 0\n")
    _load(tmp_path, "", FEDERATION_GRPC_CALL_TIMEOUT_SECONDS="1.5")
    with pytest.raises(ConfigError, match=r"setting grpc\.call_timeout_seconds"):
        _load(tmp_path, "", FEDERATION_GRPC_CALL_TIMEOUT_SECONDS="-1")


@pytest.mark.parametrize("command", [
    ["node", "--role", "keys"], ["up"], ["keys", "list", "--tenant", "t"]])
def test_commands_refuse_a_bad_setting_in_one_line(tmp_path: Path, command: list[str]) -> None:
    """No traceback, nothing started: one line naming the setting and a non-zero exit."""
    (tmp_path / "federation.toml").write_text("[grpc]\nmax_message_bytes = 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    result = subprocess.run(
        [sys.executable, "-m", "federation.cli", "--home", str(tmp_path), *command],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "federation: error: setting grpc.max_message_bytes: must be at least 1, not 0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["federation.toml"]


@pytest.mark.parametrize(("toml", "message"), [
    ("node_name = ''\n", r"setting node_name: must not be empty"),
    ("trust_domain = ' '\n", r"setting trust_domain: must not be empty"),
    ("[nodes]\nhost = ''\n", r"setting nodes\.host: must not be empty"),
    ("[[inference.models]]\nid = 'm'\nbackend = 'openai'\n",
     r"setting inference\.models\[0\]\.base_url: must not be empty"),
    ("[[inference.models]]\nid = 'm'\nbackend = 'test'\n[[inference.models]]\nid = 'm'\n",
     r"setting inference\.models\[1\]\.id: 'm' is already another model's"),
])
def test_empty_names_and_incomplete_models_are_refused(tmp_path: Path, toml: str,
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, toml)


@pytest.mark.parametrize(("toml", "message"), [
    ("[grpc]\nmax_message_bytes = 2147483648\n", r"grpc\.max_message_bytes: at most 2147483647"),
    ("[grpc]\nkeepalive_seconds = 3000000\n", r"grpc\.keepalive_seconds: at most 2147483 sec"),
    ("[pki]\nroot_validity_days = 1e7\n", r"pki\.root_validity_days: .* longer than a century"),
    ("[edge]\ntoken_ttl_seconds = 1e300\n", r"edge\.token_ttl_seconds: .* longer than a century"),
])
def test_values_too_large_for_what_they_become_are_refused(tmp_path: Path, toml: str,
                                                           message: str) -> None:
    """gRPC's C ints and x509's dates end in an OverflowError traceback past these."""
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, toml)


def test_tls_files_without_their_files_is_refused_at_load(tmp_path: Path) -> None:
    """Before `federation up` starts anything, not when its gateway child crash-loops."""
    with pytest.raises(ConfigError, match=r"setting gateway\.tls_key_file: must not be empty"):
        _load(tmp_path, "[gateway]\ntls = 'files'\ntls_cert_file = 'chain.pem'\n")


@pytest.mark.parametrize(("toml", "message"), [
    ("[edge]\noffline_after_intervals = 0.5\n", r"edge\.offline_after_intervals: at least 1"),
    ("[keys]\ndecay_per_day = -0.01\n", r"keys\.decay_per_day: must not be negative"),
    ("[council]\nrepeat_penalty = 0\n", r"council\.repeat_penalty: must be more than 0"),
])
def test_model_parameters_out_of_range_are_refused(tmp_path: Path, toml: str,
                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, toml)
