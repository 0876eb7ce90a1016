"""Server settings: defaults from a data dir, then file, environment, options."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustplane.control.settings import load_settings
from trustplane.errors import MalformedError, UsageError


def test_a_data_dir_is_enough(tmp_path: Path) -> None:
    settings = load_settings(tmp_path)
    assert settings.db_url == f"sqlite:///{tmp_path / 'trustplane.db'}"
    assert settings.kek == "file"
    assert settings.kek_path == tmp_path / "kek.json"
    assert settings.policy_path == tmp_path / "policy.yaml"
    assert settings.url == "https://127.0.0.1:8443"


def test_options_beat_environment_beats_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "server.yaml").write_text(
        "listen: 127.0.0.1:1111\nworkers: 3\nkmip:\n  port: 7000\n  host: from-file\n"
    )
    monkeypatch.setenv("TRUSTPLANE_WORKERS", "5")
    monkeypatch.setenv("TRUSTPLANE_KMIP__HOST", "from-env")
    settings = load_settings(tmp_path, listen="127.0.0.1:2222")
    assert settings.listen == "127.0.0.1:2222"  # option
    assert settings.workers == 5  # environment over file
    assert settings.kmip.host == "from-env"  # nested environment over nested file
    assert settings.kmip.port == 7000  # the file still fills what the environment leaves


def test_bad_settings_are_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text("listen: [not, a, string\n")
    with pytest.raises(MalformedError, match="not valid YAML"):
        load_settings(tmp_path)
    (tmp_path / "server.yaml").write_text("no_such_setting: 1\n")
    with pytest.raises(UsageError, match="invalid server settings"):
        load_settings(tmp_path)
    with pytest.raises(UsageError, match="no such file"):
        load_settings(tmp_path, tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="HOST:PORT"):
        _ = load_settings(tmp_path / "other", listen="nonsense").host_port
