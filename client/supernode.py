"""``python -m client.supernode``: Flower's SuperNode with short polls and activation retries
(``common.flower.supernode``, behind the Flower door)."""

from __future__ import annotations

from common.flower.supernode import main

if __name__ == "__main__":
    main()
