"""argparse types shared by the commands, so that a bad value fails the same way everywhere: one line naming it."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def seconds_between(lower: float, upper: float = math.inf, why: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number of seconds in [lower, upper]; ``why`` says where the range comes from."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and lower <= value <= upper):
            limit = f"{lower:g} or more" if math.isinf(upper) else f"between {lower:g} and {upper:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: need a number of seconds, {limit}{why}")
        return value

    return seconds
