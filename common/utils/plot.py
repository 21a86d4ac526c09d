"""Small SVG line charts, written without a plotting library (none is a dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.utils.files import atomic_write_text

WIDTH, HEIGHT, MARGIN = 360, 220, 40
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass(frozen=True)
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]


@dataclass(frozen=True)
class Panel:
    title: str
    x_label: str
    series: Sequence[Series]
    marker: tuple[float, str] | None = None
    """(x, label): a dashed vertical line, e.g. the round a run kept."""


def _panel(x0: int, panel: Panel) -> str:
    values = [v for s in panel.series for v in s.y]
    xs = [x for s in panel.series for x in s.x]
    top = max(values) if values and max(values) > 0 else 1.0
    right = max(max(xs), 1) if xs else 1
    inner_w, inner_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    parts = [
        f'<text x="{x0 + WIDTH / 2}" y="20" text-anchor="middle" font-size="13">{panel.title}</text>',
        f'<line x1="{x0 + MARGIN}" y1="{HEIGHT - MARGIN}" x2="{x0 + WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" '
        'stroke="black"/>',
        f'<line x1="{x0 + MARGIN}" y1="{MARGIN}" x2="{x0 + MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<text x="{x0 + MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end" font-size="10">{top:.3g}</text>',
        f'<text x="{x0 + MARGIN - 4}" y="{HEIGHT - MARGIN}" text-anchor="end" font-size="10">0</text>',
        f'<text x="{x0 + WIDTH - MARGIN}" y="{HEIGHT - MARGIN + 14}" text-anchor="end" font-size="10">'
        f"{panel.x_label} {right:g}</text>",
    ]
    if panel.marker is not None:
        x = x0 + MARGIN + inner_w * panel.marker[0] / right
        parts.append(
            f'<line x1="{x:.1f}" y1="{MARGIN}" x2="{x:.1f}" y2="{HEIGHT - MARGIN}" '
            'stroke="grey" stroke-dasharray="4 3"/>'
            f'<text x="{x + 3:.1f}" y="{MARGIN + 10}" font-size="9" fill="grey">{panel.marker[1]}</text>'
        )
    for index, series in enumerate(panel.series):
        colour = COLOURS[index % len(COLOURS)]
        points = [
            (x0 + MARGIN + inner_w * x / right, HEIGHT - MARGIN - inner_h * y / top)
            for x, y in zip(series.x, series.y, strict=True)
        ]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in points)
        if 1 < len(panel.series) <= len(COLOURS):  # beyond that, colours repeat and labels would not fit
            parts.append(
                f'<text x="{x0 + WIDTH - MARGIN + 4}" y="{MARGIN + 12 * index}" font-size="9" fill="{colour}">'
                f"{series.label}</text>"
            )
    return "".join(parts)


def write_line_charts(path: Path, panels: Sequence[Panel]) -> None:
    body = "".join(_panel(WIDTH * index, panel) for index, panel in enumerate(panels))
    atomic_write_text(
        path,
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH * len(panels) + MARGIN}" height="{HEIGHT}" '
        f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>{body}</svg>\n',
    )


def write_round_plot(
    path: Path,
    rounds: Sequence[int],
    ndcg: Sequence[float] | None,
    epsilon: Sequence[float] | None,
    kept_round: int | None = None,
) -> None:
    """The run's own picture: validation NDCG@10 where the server evaluates (with the round the run kept),
    epsilon (max over sites) under DP."""
    marker = None if kept_round is None else (float(kept_round), f"kept: round {kept_round}")
    panels = [] if ndcg is None else [Panel("validation NDCG@10", "round", [Series("NDCG@10", rounds, ndcg)], marker)]
    if epsilon is not None:
        panels.append(Panel("epsilon (max over sites)", "round", [Series("epsilon", rounds, epsilon)]))
    if panels:
        write_line_charts(path, panels)
