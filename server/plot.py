"""A small SVG of validation NDCG@10 and epsilon per round, written without a plotting library."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.files import atomic_write_text

WIDTH, HEIGHT, MARGIN = 360, 220, 40


def _panel(x0: int, title: str, rounds: Sequence[int], values: Sequence[float], colour: str) -> str:
    top = max(values) if values and max(values) > 0 else 1.0
    last_round = max(max(rounds), 1) if rounds else 1
    inner_w, inner_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    points = [
        (x0 + MARGIN + inner_w * r / last_round, HEIGHT - MARGIN - inner_h * v / top) for r, v in zip(rounds, values)
    ]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in points)
    return (
        f'<text x="{x0 + WIDTH / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>'
        f'<line x1="{x0 + MARGIN}" y1="{HEIGHT - MARGIN}" x2="{x0 + WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>'
        f'<line x1="{x0 + MARGIN}" y1="{MARGIN}" x2="{x0 + MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>'
        f'<text x="{x0 + MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end" font-size="10">{top:.3g}</text>'
        f'<text x="{x0 + MARGIN - 4}" y="{HEIGHT - MARGIN}" text-anchor="end" font-size="10">0</text>'
        f'<text x="{x0 + WIDTH - MARGIN}" y="{HEIGHT - MARGIN + 14}" text-anchor="end" font-size="10">round {last_round}</text>'
        f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>{dots}'
    )


def write_round_plot(path: Path, rounds: Sequence[int], ndcg: Sequence[float], epsilon: Sequence[float] | None) -> None:
    panels = _panel(0, "validation NDCG@10", rounds, ndcg, "#1f77b4")
    if epsilon is not None:
        panels += _panel(WIDTH, "epsilon (max over sites)", rounds, epsilon, "#d62728")
    width = WIDTH * (2 if epsilon is not None else 1)
    atomic_write_text(
        path,
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>{panels}</svg>\n',
    )
