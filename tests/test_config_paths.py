"""File settings name files relative to the home, whatever the working directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from federation.config import load_settings
from federation.council.members import SHIPPED_MEMBERS_FILE, load_roster, members_file_for


def test_a_relative_members_file_is_in_the_home(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(SHIPPED_MEMBERS_FILE, home / "our-members.toml")
    (home / "federation.toml").write_text("[council]\nmembers_file = 'our-members.toml'\n")
    monkeypatch.chdir(tmp_path)  # where `federation up` was started, not the home
    settings = load_settings({}, {"FEDERATION_HOME": str(home)})
    path = members_file_for(settings.home, settings.council.members_file)
    assert path == home / "our-members.toml"
    assert load_roster(path).members
    absolute = members_file_for(settings.home, str(SHIPPED_MEMBERS_FILE))
    assert absolute == SHIPPED_MEMBERS_FILE


async def test_a_missing_or_unusable_gguf_path_is_a_config_error(tmp_path: Path) -> None:
    """`federation node --role inference` then prints one line naming the setting, not
    llama.cpp's ValueError traceback."""
    from federation.config import ConfigError, ModelConfig
    from federation.inference.llamacpp import LlamaCppBackend

    missing = ModelConfig(id="m", gguf_path=str(tmp_path / "absent.gguf"))
    with pytest.raises(ConfigError, match=r"inference\.models\[\]\.gguf_path of model 'm'.*"
                                          r"no such file"):
        await LlamaCppBackend(missing).start()
    (tmp_path / "text.gguf").write_text("not a model\n")
    unusable = ModelConfig(id="m", gguf_path=str(tmp_path / "text.gguf"))
    with pytest.raises(ConfigError, match=r"gguf_path\): .*text\.gguf: not a usable GGUF"):
        await LlamaCppBackend(unusable).start()


async def test_a_relative_gguf_path_is_in_the_home(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``gateway.outbox_dir`` and ``council.members_file`` are: not in the directory the
    command was started from. A missing one is one line naming where it was looked for."""
    from federation.config import ConfigError
    from federation.inference.llamacpp import LlamaCppBackend

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "federation.toml").write_text(
        "[[inference.models]]\nid = 'm'\ngguf_path = 'models/m.gguf'\n"
        "[[inference.models]]\nid = 'abs'\ngguf_path = '/srv/models/a.gguf'\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models").mkdir(parents=True)
    (elsewhere / "models" / "m.gguf").write_text("not the home's file\n")
    monkeypatch.chdir(elsewhere)  # where `federation node` was started, not the home
    settings = load_settings({}, {"FEDERATION_HOME": str(home)})
    relative, absolute = settings.inference.models
    assert relative.gguf_path == str(home / "models" / "m.gguf")
    assert absolute.gguf_path == "/srv/models/a.gguf"
    with pytest.raises(ConfigError) as missing:
        await LlamaCppBackend(relative).start()
    message = str(missing.value)
    assert len(message.splitlines()) == 1
    assert f": {home / 'models' / 'm.gguf'}: no such file" in message
    assert "inference.models[].gguf_path of model 'm'" in message
