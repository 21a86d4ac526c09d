"""The architecture page stays true: every file, folder and module it names in backticks exists, and it is in the
documentation site's navigation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGES = ("common", "client", "server", "simulations", "tests")
FILE_SUFFIXES = (".py", ".md", ".toml", ".yml", ".json")


def named(text: str) -> tuple[list[str], list[str]]:
    """The paths (with a "/" or a file suffix) and the dotted modules of the project that ``text`` names in inline
    backticks, outside fenced code blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    spans = re.findall(r"`([^`\n]+)`", prose)
    paths = [span for span in spans if " " not in span and ("/" in span or span.endswith(FILE_SUFFIXES))]
    modules = [span for span in spans if " " not in span and span not in paths
               and re.fullmatch(rf"(?:{'|'.join(PACKAGES)})(?:\.\w+)+", span)]
    return paths, modules


def missing_module(dotted: str, root: Path = ROOT) -> str:
    """Why ``dotted`` (a module, or a module and one top-level name in it) names nothing; "" when it names something."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:cut])
        source = next((file for file in (base.with_suffix(".py"), base / "__init__.py") if file.is_file()), None)
        if source is None:
            continue
        rest = parts[cut:]
        if not rest:
            return ""
        if len(rest) > 1:
            return f"{dotted}: {'.'.join(rest)} is not one top-level name of {source.relative_to(root)}"
        tree = ast.parse(source.read_text(encoding="utf-8"))
        names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        names |= {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                  for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                  if isinstance(target, ast.Name)}
        return "" if rest[0] in names else f"{dotted}: {source.relative_to(root)} defines no {rest[0]}"
    return f"{dotted}: no such module"


def problems(text: str, root: Path = ROOT) -> list[str]:
    paths, modules = named(text)
    gone = [f"{path}: no such file or folder" for path in paths if not (root / path.rstrip("/")).exists()]
    return gone + [problem for module in modules if (problem := missing_module(module, root))]


def test_every_file_and_module_the_architecture_page_names_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    paths, modules = named(text)
    assert len(paths) > 20 and len(modules) >= 3, "the page names its files and modules in backticks"
    assert problems(text) == []


def test_a_name_that_is_gone_is_reported(tmp_path: Path) -> None:
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "here.py").write_text("class Kept:\n    pass\nLIMIT = 1\n", encoding="utf-8")
    page = ("`common/here.py`, `common/gone.py`, `common/` and `common.here.Kept`, `common.here.LIMIT`, "
            "`common.here.Lost`, `common.gone`, `site` and `fedtail simulate`\n```\n`common/in_a_block.py`\n```\n")
    assert problems(page, tmp_path) == [
        "common/gone.py: no such file or folder",
        "common.here.Lost: common/here.py defines no Lost",
        "common.gone: no such module",
    ]


def test_the_page_is_in_the_sites_navigation() -> None:
    assert "architecture.md" in (ROOT / "docs" / "mkdocs" / "mkdocs.yml").read_text(encoding="utf-8")
