"""Settings: defaults < YAML < environment < overrides, frozen, unknown keys rejected."""

from __future__ import annotations

import pydantic
import pytest

from puremesh.rpc.settings import ServerSettings, SettingsError, load_settings
from puremesh.services.verify.settings import ENV_PREFIX, VerifySettings


def test_layering(tmp_path):
    path = tmp_path / "verify.yaml"
    path.write_text("workers: 3\nserver:\n  port: 6000\n  host: 0.0.0.0\n")
    env = {f"{ENV_PREFIX}SERVER__PORT": "7000", f"{ENV_PREFIX}ITEM_TIMEOUT_SECONDS": "2.5", "OTHER": "x"}
    settings = load_settings(VerifySettings, path, ENV_PREFIX, {"server": {"host": None}}, environ=env)
    assert settings.workers == 3 and settings.server.port == 7000 and settings.server.host == "0.0.0.0"
    assert settings.item_timeout_seconds == 2.5
    settings = load_settings(VerifySettings, path, ENV_PREFIX, {"server": {"port": 1}}, environ=env)
    assert settings.server.port == 1
    with pytest.raises(pydantic.ValidationError):
        settings.workers = 5  # frozen


@pytest.mark.parametrize(
    ("yaml_text", "env", "message"),
    [
        ("workerz: 2\n", {}, "workerz"),
        ("workers: 0\n", {}, "workers"),
        ("- a\n", {}, "mapping"),
        ("workers: [\n", {}, "not valid YAML"),
        ("", {f"{ENV_PREFIX}SERVER__PORT": "99999"}, "server.port"),
    ],
)
def test_errors_name_the_setting(tmp_path, yaml_text, env, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        load_settings(VerifySettings, path, ENV_PREFIX, environ=env)


def test_missing_file():
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(ServerSettings, "/nonexistent/settings.yaml")


def test_shipped_run_config_is_valid():
    from pathlib import Path

    from puremesh.cli.run_settings import RunSettings

    root = Path(__file__).resolve().parents[2]
    settings = load_settings(RunSettings, root / "configs" / "local.yaml")
    assert settings.learner.algo.credit == "min" and settings.mesh.rollout_replicas == 2
