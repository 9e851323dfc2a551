"""The children of ``federation up`` resolve the settings the supervisor was given."""

from __future__ import annotations

import io
from pathlib import Path

from federation.cli import _overrides, build_parser
from federation.config import load_settings
from federation.launch.children import Progress
from federation.launch.up import Federation


def test_children_of_up_get_the_log_level_flag(tmp_path: Path) -> None:
    """``federation --log-level DEBUG up`` with ``FEDERATION_LOG_LEVEL=ERROR`` in the
    environment: the flag wins in the supervisor, and must in every node it starts."""
    (tmp_path / "federation.toml").write_text("log_level = 'WARNING'\n")
    env = {"FEDERATION_HOME": str(tmp_path), "FEDERATION_LOG_LEVEL": "ERROR"}
    parser = build_parser()
    args = parser.parse_args(["--log-level", "debug", "up"])
    settings = load_settings(_overrides(args), env)
    assert settings.log_level == "DEBUG"
    federation = Federation(settings, Progress(io.StringIO()))
    federation.ports = {"keys": 1}
    federation.metrics_ports = {"keys": 2}
    for argv in (federation._node_argv("keys"), federation._gateway_argv()):
        child_args = parser.parse_args(argv[3:])  # past `python -m federation.cli`
        assert load_settings(_overrides(child_args), env).log_level == "DEBUG"


def test_up_uses_the_configured_ports_of_every_node(tmp_path: Path) -> None:
    """Fixed gRPC and metrics ports in federation.toml are the ones `federation up` hands
    its nodes; only the ones left at 0 are picked."""
    (tmp_path / "federation.toml").write_text(
        "[gateway]\nhttp_port = 0\n[nodes]\nkeys_port = 45101\nkeys_metrics_port = 45102\n")
    settings = load_settings({}, {"FEDERATION_HOME": str(tmp_path)})
    federation = Federation(settings, Progress(io.StringIO()))
    federation._allocate_ports()
    assert federation.ports["keys"] == 45101
    assert federation.metrics_ports["keys"] == 45102
    assert "--metrics-port" in (argv := federation._node_argv("keys"))
    assert argv[argv.index("--metrics-port") + 1] == "45102"
    assert federation.metrics_ports["memory"] not in (0, 45102)
