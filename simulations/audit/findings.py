"""What the audit finds (one finding per problem: its severity and where it is), and the tolerance it compares at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RELATIVE_TOLERANCE = 0.02
"""Accountants differ by their numerics; 2% is far above that and far below any real understatement."""
ABSOLUTE_TOLERANCE = 1e-3
Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}: {self.where}: {self.message}"


def exceeds(value: float, reference: float) -> bool:
    return value > reference * (1 + RELATIVE_TOLERANCE) + ABSOLUTE_TOLERANCE
