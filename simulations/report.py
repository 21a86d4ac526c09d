"""Human-readable tables over the metrics.json layout."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

COLUMNS = ("overall", "tail", "torso", "head")
BEYOND_ACCURACY = ("coverage@10", "gini@10", "tail_share@10", "novelty@10", "ild@10", "miscalibration@10")
"""The item-side rows of every table: per user group when the evaluation measured them so (``item_space``)."""


def _row(name: str, report: dict[str, Any], metric: str) -> str:
    cells = [{**report.get("items", {}), **report["overall"]}.get(metric, float("nan"))]
    cells += [report["groups"][g].get(metric, float("nan")) for g in COLUMNS[1:]]
    return f"{name:<32}" + "".join(f"{value:>10.4f}" for value in cells)


def format_metrics_table(
    report: dict[str, Any], title: str = "", metrics: tuple[str, ...] = ("ndcg@10", "hr@10")
) -> str:
    """Model and baselines side by side, overall and per user group, with group sizes; then the beyond-accuracy
    metrics the report holds (items: overall only when it was measured without an item space)."""
    sizes = [report["overall"].get("users", 0)] + [report["groups"][g]["users"] for g in COLUMNS[1:]]
    lines = [title] if title else []
    lines.append(f"{'':<32}" + "".join(f"{c:>10}" for c in COLUMNS))
    lines.append(f"{'users':<32}" + "".join(f"{n:>10d}" for n in sizes))
    rows = [("model", report)] + [(name.replace("_", "-"), sub) for name, sub in report.get("baselines", {}).items()]
    beyond = tuple(metric for metric in BEYOND_ACCURACY if metric in report.get("items", {}))
    for metric in metrics + beyond:
        for name, sub in rows:
            lines.append(_row(f"{name} {metric.upper()}", sub, metric))
    if "item_space" in report:
        lines.append(f"diversity and calibration measured with {report['item_space']}")
    return "\n".join(lines)


def format_federated_summary(summary: dict[str, Any], title: str = "") -> str:
    """The federated model beside most-popular, which round it is, then each site's epsilon (or a loud NON-PRIVATE)."""
    lines = [format_metrics_table(summary, title=title, metrics=("ndcg@10",))]
    run = summary.get("run", {})
    if "model_round" in run:
        lines.append(f"model: round {run['model_round']} of {run['rounds_completed']} ({run['model_selection']})")
    privacy = summary["privacy"]
    if not privacy["dp"]:
        lines.append("privacy: NONE. This model was trained WITHOUT differential privacy.")
        return "\n".join(lines)
    lines.append(
        f"privacy: epsilon {privacy['epsilon']:.3f} (max over sites), delta {privacy['delta']:g}, unit: one user"
    )
    lines.append("site epsilon: " + "  ".join(f"{site}={eps:.3f}" for site, eps in privacy["per_site"].items()))
    if "trust" in privacy:
        lines.append(f"trust: {privacy['trust']}")
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table from already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
