"""Flower's internals are imported behind one door (common/flower) only; everything else uses Flower's app API."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOOR = ROOT / "common" / "flower"
PACKAGES = ("common", "client", "server", "simulations")
APP_API = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy"}
"""Flower's public app API: any of their names may be imported anywhere."""
COMMON_NAMES = {"Array", "ArrayRecord", "ConfigRecord", "Context", "Message", "MetricRecord", "RecordDict", "Scalar"}
"""flwr.common's documented names of the Message API (not its legacy types, which SecAgg+ still needs)."""


def flower_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every Flower import in ``path``, indented ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "flwr":
            found.append((node.lineno, str(node.module), [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "flwr"]
    return found


def outside_app_api(module: str, names: list[str]) -> bool:
    if module in APP_API:
        return False
    return not (module == "flwr.common" and names and set(names) <= COMMON_NAMES)


def test_only_the_door_imports_flower_outside_its_app_api() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module} {names}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if DOOR not in path.parents
        for line, module, names in flower_imports(path)
        if outside_app_api(module, names)
    ]
    assert offending == [], "Flower internals outside common/flower:\n" + "\n".join(offending)


def test_the_check_sees_an_internal_import_even_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("from flwr.app import Message\n\ndef f():\n    from flwr.supercore.run import Run\n")
    found = flower_imports(module)
    assert [outside_app_api(name, names) for _, name, names in found] == [False, True]
    assert outside_app_api("flwr.common", ["FitRes"]) and not outside_app_api("flwr.common", ["Scalar"])


def test_the_readme_names_every_module_of_the_door() -> None:
    readme = (DOOR / "README.md").read_text(encoding="utf-8")
    modules = [path.name for path in DOOR.glob("*.py") if path.name != "__init__.py"]
    assert [name for name in modules if f"`{name}`" not in readme] == []
