"""Run settings: pyproject's Flower run config and the code agree; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

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
    with pytest.raises(ConfigError, match="user-update='deltas': use one of gradient, delta"):
        RunSettings(noise="central", user_update="deltas")
    with pytest.raises(ConfigError, match="user-update='delta' needs noise central or distributed"):
        RunSettings(user_update="delta")
    assert RunSettings.from_run_config({"epsilon": 4}).epsilon == 4.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epsilon", -1.0), ("delta", 1.5), ("max-grad-norm", 0.0), ("batch-size", 0), ("learning-rate", 0.0),
        ("heads", 3), ("user-steps", 0), ("user-learning-rate", -0.5),
    ],
)
def test_bad_values_fail_at_start_naming_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key.split("-")[0] if key != "heads" else "divisible"):
        RunSettings.from_run_config({key: value})


FLOAT_KEYS = [
    name.replace("_", "-") for name, field in RunSettings.__dataclass_fields__.items() if field.type == "float"
]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_setting_must_be_finite_for_every_reader(key: str, value: float) -> None:
    # from_run_config is what the ServerApp and the ClientApp read (`flwr run` users included); the CLI builds
    # RunSettings directly. Both meet the same rule, whatever float field is added later.
    with pytest.raises(ConfigError, match=f"{key}={value}: must be a finite number"):
        RunSettings.from_run_config({key: value})
    with pytest.raises(ConfigError, match="must be a finite number"):
        RunSettings(**{key.replace("-", "_"): value})


@pytest.mark.parametrize("field", ["heads", "hidden", "max_len", "blocks"])
def test_a_model_size_below_one_is_a_config_error_naming_it(field: str) -> None:
    """``heads = 0`` used to divide by zero (a traceback from ``fedtail simulate --heads 0``)."""
    with pytest.raises(ConfigError, match=f"{field}=0"):
        RunSettings(**{field: 0})
