"""``python -m client.runtime``: the site's ClientApp runtime (``common.flower.runtime``), warm with this release.

The runtime is a workaround of Flower's internals and lives behind the Flower door (``common/flower``); this module
only hands it the installed release's ClientApp, which lies above ``common/``.
"""

from __future__ import annotations

import sys

from flwr.clientapp import ClientApp

from common.flower.runtime import main


def load_installed_app() -> ClientApp:
    """The installed release's ClientApp, imported once (torch, opacus, flwr, pandas): what every warm task reuses."""
    from client.app import app  # noqa: PLC0415 - imported here so that refusing sites and tests stay light

    return app


if __name__ == "__main__":
    sys.exit(main(load_installed_app))
