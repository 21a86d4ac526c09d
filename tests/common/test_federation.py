"""Run settings: pyproject's Flower run config and the code agree; bad values are named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.federation import RunSettings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_lists_every_setting_with_the_code_defaults() -> None:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunSettings.from_run_config(config) == RunSettings()
    assert set(config) == set(RunSettings().to_run_config())


def test_wrong_types_and_unknown_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="rounds='5'"):
        RunSettings.from_run_config({"rounds": "5"})
    with pytest.raises(ConfigError, match="unknown run config keys"):
        RunSettings.from_run_config({"epsilom": 1.0})
    with pytest.raises(ConfigError, match="partitioning"):
        RunSettings(partitioning="random")
    assert RunSettings.from_run_config({"epsilon": 4}).epsilon == 4.0
