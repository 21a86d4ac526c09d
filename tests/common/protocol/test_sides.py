"""The site and the coordinator meet only through common/ (the protocol) and Flower: neither imports the other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def imported_packages(package: str) -> dict[str, set[str]]:
    """For each file of ``package``: the top-level packages it imports, indented imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_server_and_client_never_import_each_other_and_common_neither() -> None:
    forbidden = {"server": {"client", "simulations"}, "client": {"server", "simulations"},
                 "common": {"client", "server", "simulations"}}
    offending = [
        f"{path} imports {sorted(names & above)}"
        for package, above in forbidden.items()
        for path, names in imported_packages(package).items()
        if names & above
    ]
    assert offending == []
