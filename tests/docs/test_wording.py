"""Docs, docstrings and help speak to users: no paths of a development machine, no branch names, no words about how
the work was organised (which stop, which issue, who helped). Each finding is named with its file and line."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATTERNS = {
    "a machine path": re.compile(r"/work/|(?<![\w.])/tmp/|\bshared/data\b|shared/DESIGN|\bcpu\.lock\b|\bCPU lock\b"),
    "a branch name": re.compile(r"\bbranch(es)? `|\bon branch\b|\bmain [0-9a-f]{7}\b|\bcode of commit\b"),
    "a word about the work's organisation": re.compile(
        r"\b(this|later|earlier|previous|next) (stop|session)\b|\bissue \d{1,2}\b|\bissue's\b|\bissues? \d{1,2}(,|\b)"
        r"|\bhelpers?\b", re.IGNORECASE,
    ),
}


def _texts() -> list[Path]:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    sources = [path for package in ("common", "client", "server", "simulations")
               for path in sorted((ROOT / package).rglob("*.py"))]
    return documents + sources + [ROOT / "docs" / "mkdocs" / "hooks.py", ROOT / "pyproject.toml"]


def test_docs_docstrings_and_help_name_no_machine_branch_or_work_process() -> None:
    findings = []
    for path in _texts():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for what, pattern in PATTERNS.items():
                found = pattern.search(line)
                if found:
                    findings.append(f"{path.relative_to(ROOT)}:{number}: {what}: {found.group(0)!r}")
    assert not findings, "\n".join(findings)


def test_the_check_finds_what_it_looks_for() -> None:
    for what, line in [("a machine path", "see /work/shared/data/ml-100k"), ("a machine path", "out to /tmp/x"),
                       ("a branch name", "on branch `lifelong`"), ("a branch name", "(main 2e08687)"),
                       ("a word about the work's organisation", "in this stop we"),
                       ("a word about the work's organisation", "as issue 17 asked"),
                       ("a word about the work's organisation", "a helper wrote")]:
        assert PATTERNS[what].search(line), (what, line)
    assert not any(pattern.search("tmp_path / 'runs'; the reissue 170 of issues") for pattern in PATTERNS.values())
