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
