"""A coordinator's own copy of the fedtail app, as `flwr run FOLDER` would upload it."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.utils.processes import APP_DIR

APP_PACKAGES = ("common", "client", "server")
"""What pyproject.toml's fab-include puts in the bundle, besides pyproject.toml itself."""


def app_copy(folder: Path, dp_appendix: str = "") -> Path:
    """The app's bundled files copied to ``folder/fedtail``, ``dp_appendix`` added to the end of client/dp_sgd.py."""
    app = folder / "fedtail"
    app.mkdir(parents=True)
    shutil.copy(APP_DIR / "pyproject.toml", app / "pyproject.toml")
    for package in APP_PACKAGES:
        shutil.copytree(APP_DIR / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    if dp_appendix:
        with (app / "client" / "dp_sgd.py").open("a", encoding="utf-8") as handle:
            handle.write("\n" + dp_appendix)
    return app
