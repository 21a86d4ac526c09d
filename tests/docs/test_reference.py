"""The documentation site's reference is generated from the code's declarations, complete and current."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path
from types import ModuleType

import pytest

from client.policy import RUN_RANGES, SitePolicy
from common.federation import RunSettings

HOOKS = Path(__file__).resolve().parents[2] / "docs" / "mkdocs" / "hooks.py"


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", HOOKS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_run_setting_is_listed_with_its_default_and_range(hooks: ModuleType) -> None:
    table = hooks.run_settings()
    for declared in fields(RunSettings):
        assert f"| `{declared.name.replace('_', '-')}` |" in table, declared.name
    assert "| `epsilon` | `--epsilon` | `8.0` | > 0 |" in table
    assert "| `fraction-sites` | `--fraction-sites` | `1.0` | > 0, <= 1 |" in table


def test_every_node_config_key_of_the_site_policy_is_listed(hooks: ModuleType) -> None:
    table = hooks.node_config()
    for declared in fields(SitePolicy):
        if declared.name == "run_ranges":  # a pair of keys per checked run-config value
            assert all(f"| `min-{key}`, `max-{key}` |" in table for key in RUN_RANGES)
        else:
            assert f"| `{declared.name.replace('_', '-')}` |" in table, declared.name
    assert "| `trust-coordinator-noise` | `false` |" in table


def test_every_command_has_its_help_on_the_commands_page(hooks: ModuleType) -> None:
    page = hooks.cli()
    for command in ("fedtail simulate", "fedtail deploy catalog", "fedtail deploy bundle-hash", "fedtail data sites",
                    "fedtail audit", "python -m client.supernode", "python -m client.runtime"):
        assert f"## `{command}`" in page, command
    assert "--activation-wait" in page


def test_the_flower_page_is_the_doors_readme(hooks: ModuleType) -> None:
    page = hooks.on_page_markdown("# Flower\n\n<!-- reference: flower-door -->\n")
    assert ".ci/flower-newest" in page and "`secaggplus_driver.py`" in page
    assert "# Flower's internals, behind one door" not in page  # the page's own title stands above it


def test_a_page_marker_is_replaced_and_an_unknown_one_is_an_error(hooks: ModuleType) -> None:
    page = hooks.on_page_markdown("# Node config\n\n<!-- reference: node-config -->\n")
    assert "<!-- reference" not in page and "`max-epsilon`" in page
    with pytest.raises(ValueError, match="unknown reference marker"):
        hooks.on_page_markdown("<!-- reference: nothing -->")
