"""One value out of a Flower message's records, where the other side may have sent anything."""

from __future__ import annotations

from flwr.app import ConfigScalar


def scalar(value: object) -> ConfigScalar:
    """``value`` when it is one number, string or bytes; anything else (a list, an array) is the sender's error.

    Records hold lists and arrays too, so ``int(record[key])`` does not type-check, and on a list it fails anyway:
    this says so in the same way (TypeError), naming what came instead.
    """
    if isinstance(value, (int, float, str, bytes)):
        return value
    raise TypeError(f"expected one number or string, got {type(value).__name__}")
