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
    with pytest.raises(ConfigError, match="model-selection='best'"):
        RunSettings(model_selection="best")
    assert RunSettings.from_run_config({"epsilon": 4}).epsilon == 4.0


@pytest.mark.parametrize(
    ("key", "value"),
    [("epsilon", -1.0), ("delta", 1.5), ("max-grad-norm", 0.0), ("batch-size", 0), ("learning-rate", 0.0), ("heads", 3)],
)
def test_bad_values_fail_at_start_naming_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key.split("-")[0] if key != "heads" else "divisible"):
        RunSettings.from_run_config({key: value})
