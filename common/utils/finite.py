"""The one test of "is every value finite" over named tensors, shared by the server (site updates, aggregates) and by
model loading (``fedtail serve``, ``fedtail evaluate``, hot reload)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array


def first_non_finite(arrays: Mapping[str, torch.Tensor | np.ndarray | Array]) -> str | None:
    """The name of the first floating-point array holding a NaN or an infinity; None when every one is finite.

    Integer arrays (counts, buffers) are always finite and are skipped. Flower ``Array`` values are read as numpy.
    """
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name
            continue
        array = value.numpy() if isinstance(value, Array) else np.asarray(value)
        if np.issubdtype(array.dtype, np.inexact) and not bool(np.isfinite(array).all()):
            return name
    return None
