"""Writes that never leave a half-written file where a good one was.

Each write goes to a temporary name beside the target and is renamed into
place: a crash or a full disk mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.errors import DataError


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def save_torch(path: Path, payload: Any) -> None:
    atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load_torch(path: Path, what: str) -> Any:
    """Tensors and plain containers only (``weights_only``); a corrupt or foreign file is a one-line DataError on
    ``what`` (torch's own messages run to paragraphs, and for a weights-only refusal advise loading unsafely)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"cannot read {what}: not a file of tensors (corrupt, or holding objects)", path) from None
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise DataError(f"cannot read {what}: {str(error).splitlines()[0] if str(error) else error!r}", path) from None
