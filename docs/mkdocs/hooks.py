"""MkDocs hook: the reference pages are generated at build time from the one declaration of each thing.

A page holds a marker line ``<!-- reference: NAME -->`` and this hook replaces it with the table or help text for
NAME: ``run-settings`` (``common.federation.RunSettings``: each setting's run-config key, command-line option,
default, allowed values and help), ``node-config`` (``client.policy.SitePolicy``: each key's default, with its meaning
from the module's documented key list), ``cli`` (the ``--help`` of every command) and ``flower-door`` (the README of
``common/flower``: the Flower versions supported and each workaround of Flower's internals). Nothing is copied by
hand, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout these docs describe

MARKER = re.compile(r"^<!-- reference: ([a-z-]+) -->$", re.MULTILINE)
PROBES = (-1.0, 0.0, 1e-9, 0.999, 1.0, 1.001, 2.0, 1e6)
OTHERS = "depends on other settings"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _valid(name: str, value: float) -> bool:
    from common.errors import ConfigError  # noqa: PLC0415 - the hook imports the project only when building
    from common.federation import RunSettings  # noqa: PLC0415

    try:
        replace(RunSettings(), **{name: value})
    except (ConfigError, TypeError, ValueError):
        return False
    return True


def _numeric_range(name: str, kind: str) -> str:
    """What ``RunSettings`` accepts for one numeric setting alone (others at their defaults), found by asking it."""
    probes = [p for p in PROBES if kind == "float" or float(p).is_integer()]
    ok = {p: _valid(name, int(p) if kind == "int" else p) for p in probes}
    if ok[-1.0]:
        lower = ""
    elif ok[0.0]:
        lower = ">= 0"
    elif ok.get(1e-9):
        lower = "> 0"
    elif ok[1.0]:
        lower = ">= 1"
    else:
        lower = OTHERS
    if ok[1e6]:
        upper = ""
    elif kind == "float" and ok[1.0] and not ok[1.001]:
        upper = "<= 1"
    elif kind == "float" and ok[0.999] and not ok[1.0]:
        upper = "< 1"
    else:
        upper = OTHERS
    return ", ".join(dict.fromkeys(part for part in (lower, upper) if part)) or "any"


def run_settings() -> str:
    from common.federation import RunSettings  # noqa: PLC0415
    from common.recipe import FILLS  # noqa: PLC0415

    rows = ["| run config key | `fedtail simulate` option | default | allowed | meaning |", "|---|---|---|---|---|"]
    for declared in fields(RunSettings):
        meta, kind = declared.metadata, str(declared.type)
        key = declared.name.replace("_", "-")
        option = f"`--{meta['flag'] or key}`" if meta["cli"] else "(run config only)"
        if meta["choices"]:
            allowed = ", ".join(f"`{choice}`" for choice in meta["choices"])
        elif kind == "bool":
            allowed = "`true`, `false`"
        elif kind in ("int", "float"):
            allowed = _numeric_range(declared.name, kind)
        else:
            allowed = "text"
        default = f"`{declared.default!r}`" if kind == "str" else f"`{str(declared.default).lower()}`" \
            if kind == "bool" else f"`{declared.default}`"
        if declared.name in FILLS:
            default += (" (noise=central or distributed under `fedtail simulate`: the "
                        "[recipe rule](../privacy.md#the-recipe-rule)'s)")
        rows.append(f"| `{key}` | {option} | {_cell(default)} | {_cell(allowed)} | {_cell(meta['help'])} |")
    return "\n".join(rows)


def _documented_keys(doc: str) -> dict[str, str]:
    """The ``- ``key``: meaning`` list of a module docstring, as key -> meaning."""
    meanings: dict[str, str] = {}
    for item in re.split(r"\n- ", doc.split("\n\n", 1)[-1]):
        found = re.match(r"``([a-z-]+)``:\s*(.*)", item, re.DOTALL)
        if found:
            meaning = found.group(2).split("\n\n", 1)[0]  # the item ends at the first blank line
            meanings[found.group(1)] = " ".join(meaning.split()).rstrip(";.") + "."
    return meanings


def node_config() -> str:
    import client.policy  # noqa: PLC0415

    meanings = _documented_keys(client.policy.__doc__ or "")
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for declared in fields(client.policy.SitePolicy):
        key = declared.name.replace("_", "-")
        if declared.name == "run_ranges":  # one pair of keys per checked run-config value
            rows += [f"| `min-{checked}`, `max-{checked}` | `{lower:g}`, `{upper:g}` | the range a run's `{checked}` "
                     "must lie in (inclusive); outside it the site declines before reading any data |"
                     for checked, (lower, upper) in client.policy.RUN_RANGES.items()]
            continue
        if key not in meanings:
            raise ValueError(f"client.policy documents no meaning for node config key {key!r}")
        default = str(declared.default).lower() if isinstance(declared.default, bool) else declared.default
        if isinstance(default, float) and math.isfinite(default) and default.is_integer() and key != "delta":
            default = int(default)
        rows.append(f"| `{key}` | `{default}` | {_cell(meanings[key])} |")
    return "\n".join(rows)


def _commands(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:  # argparse keeps subcommands here only
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                found += _commands(subparser, f"{name} {sub}")
    return found


def cli() -> str:
    from common.flower.runtime import build_parser as runtime_parser  # noqa: PLC0415
    from common.flower.supernode import build_parser as supernode_parser  # noqa: PLC0415
    from simulations.cli import build_parser  # noqa: PLC0415

    os.environ["COLUMNS"] = "110"  # argparse wraps help at the terminal's width
    sections = []
    for name, parser in [*_commands(build_parser(), "fedtail"), ("python -m client.supernode", supernode_parser()),
                         ("python -m client.runtime", runtime_parser())]:
        sections.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    sections.append("`python -m client.supernode` accepts every option of Flower's `flower-supernode` besides its "
                    "own; its `--help` lists them all.\n")
    return "\n".join(sections)


def flower_door() -> str:
    """The Flower door's README (``common/flower/README.md``), below the page's own title."""
    readme = Path(__file__).resolve().parents[2] / "common" / "flower" / "README.md"
    return readme.read_text(encoding="utf-8").split("\n", 1)[1].lstrip()


GENERATORS = {"run-settings": run_settings, "node-config": node_config, "cli": cli, "flower-door": flower_door}


def on_page_markdown(markdown: str, **_: Any) -> str:
    def generate(marker: re.Match[str]) -> str:
        name = marker.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown reference marker {name!r}; known: {sorted(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)
