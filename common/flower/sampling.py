"""Waiting for sites to connect, as Flower's own strategies wait (``flwr.serverapp.strategy.strategy_utils``, outside
Flower's documented app API)."""

from __future__ import annotations

from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

__all__ = ["connected_nodes", "sample_nodes"]


def connected_nodes(grid: Grid, min_nodes: int) -> list[int]:
    """Every connected node, once at least ``min_nodes`` are (Flower's wait, logging while it waits)."""
    _, nodes = sample_nodes(grid, min_nodes, 0)
    return nodes
