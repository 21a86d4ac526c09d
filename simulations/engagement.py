"""Beyond one accurate item, for a saved model: ``fedtail engagement MODEL_DIR DATASET --out DIR``.

Three tables, printed and written to ``DIR/engagement.json`` (the trade-off curve also as ``DIR/tradeoff.svg``):

- trade-off: the diversity re-ranker (``common.recommender.rerank``) at each weight in ``--weights``, on the
  model's scores and on them with each tail penalty in ``--tail-penalties`` (``common.recommender.ranking``):
  NDCG@10, intra-list diversity, tail-item share per user group, most-popular beside them;
- augmentation: NDCG@10 overall and on tail users with pseudo-prior items (``common.recommender.augment``) up to
  each length in ``--augment-to``, on the test histories and on them cut to their last 1 and 3 items;
- replay: ``--steps`` steps of ``common.recommender.replay`` for the plain model, with the MMR re-ranker
  (``--diversity``), the repetition penalty (``--repeat-penalty``), both, the augmentation (``--augment``), and all.

Everything is computed from the saved model and public item content (its ``item_vectors.pt``) alone; the
test data's popularity feeds only the most-popular baseline and the item-side metrics, as in every table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from common.data.datasets import load_dataset
from common.data.split import evaluation_cases, item_popularity
from common.recommender.artifacts import load_model
from common.recommender.augment import AugmentOptions, PseudoPrior, augmented_scorer
from common.recommender.content import load_item_vectors
from common.recommender.evaluation import Scorer, evaluate, model_scorer, popularity_scorer, reranked_scorer
from common.recommender.item_space import item_space
from common.recommender.metrics import GROUPS, KS
from common.recommender.ranking import RankingOptions, model_prior
from common.recommender.replay import Reranking, replay
from common.recommender.rerank import DiversityOptions, diversity_reorder
from common.recommender.training import pick_device
from common.utils.files import write_json
from common.utils.plot import Panel, Series, write_line_charts
from simulations.longtail import SHORT_HISTORIES, last_items
from simulations.report import markdown_table

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)
TAIL_PENALTIES = (0.0, 0.5)
AUGMENT_TO = (0, 3, 5, 10)
STEPS = 5


def engagement_tables(
    model_dir: Path, dataset_spec: str, weights: tuple[float, ...], tail_penalties: tuple[float, ...],
    augment_to: tuple[int, ...], chosen: DiversityOptions, augment: AugmentOptions, steps: int,
) -> dict[str, Any]:
    device = pick_device()
    model, catalog = load_model(model_dir, device=device)
    dataset, _ = load_dataset(dataset_spec).restricted_to(catalog)
    _, sequences = dataset.sequences(catalog)
    max_len = model.config.max_len
    cases = evaluation_cases(sequences, "test", max_len)
    popularity = item_popularity(sequences, catalog.num_items)
    space = item_space(model, load_item_vectors(model_dir, catalog.num_items))
    plain = model_scorer(model, device)
    popular = evaluate(popularity_scorer(popularity), cases, popularity, len(sequences), space=space)
    tradeoff: list[dict[str, Any]] = [{"diversity": "most-popular", "tail_penalty": 0.0, **_groups(popular)}]
    prior = model_prior(model)
    for penalty in tail_penalties:
        base = plain if penalty == 0 else reranked_scorer(plain, prior, RankingOptions(tail_penalty=penalty))
        for weight in weights:
            reorder = diversity_reorder(space.unit, DiversityOptions(weight, 0.0), max(KS)) if weight > 0 else None
            report = evaluate(base, cases, popularity, len(sequences), space=space, reorder=reorder)
            tradeoff.append({"diversity": weight, "tail_penalty": penalty, **_groups(report)})
    pseudo = PseudoPrior.from_model(model)
    augmentation = []
    for keep in (None, *SHORT_HISTORIES):
        variant = cases if keep is None else last_items(cases, keep)
        for length in augment_to:
            scorer: Scorer = plain if length == 0 else augmented_scorer(plain, pseudo, AugmentOptions(length))
            report = evaluate(scorer, variant, popularity, len(sequences))
            augmentation.append({"histories": "test" if keep is None else f"last {keep}", "augment_to": length,
                                 "ndcg@10": report["overall"]["ndcg@10"],
                                 "tail_ndcg@10": report["groups"]["tail"]["ndcg@10"]})
    augmented = augmented_scorer(plain, pseudo, augment)
    mmr = Reranking(space.unit, DiversityOptions(chosen.diversity, 0.0))
    repetition = Reranking(space.unit, DiversityOptions(0.0, chosen.repeat_penalty))
    both = Reranking(space.unit, chosen)
    replays = {
        name: replay(scorer, sequences, steps, max_len, reranking=reranked)
        for name, scorer, reranked in (("plain", plain, None), ("MMR", plain, mmr), ("repetition", plain, repetition),
                                       ("MMR + repetition", plain, both), ("augmented", augmented, None),
                                       ("all", augmented, both))
    }
    return {"model_dir": str(model_dir), "dataset": dataset_spec, "item_space": space.description,
            "chosen": {"diversity": chosen.diversity, "repeat_penalty": chosen.repeat_penalty,
                       "augment_to": augment.augment_to},
            "tradeoff": tradeoff, "augmentation": augmentation, "replay": replays}


def _groups(report: dict[str, Any]) -> dict[str, float]:
    """NDCG@10, ILD@10, tail-item share@10 and miscalibration@10, overall and per group, as flat keys."""
    out = {}
    for metric in ("ndcg@10", "ild@10", "tail_share@10", "miscalibration@10"):
        out[f"overall {metric}"] = {**report["items"], **report["overall"]}[metric]
        out.update({f"{group} {metric}": report["groups"][group][metric] for group in GROUPS})
    return out


def format_tables(result: dict[str, Any]) -> str:
    tradeoff = markdown_table(
        ["diversity", "tail penalty", *[f"NDCG@10 {g}" for g in ("overall", *GROUPS)], "ILD@10 overall",
         "ILD@10 tail", "tail-item share overall", "tail-item share tail", "miscalibration overall"],
        [[str(row["diversity"]), f"{row['tail_penalty']:g}",
          *(f"{row[f'{g} ndcg@10']:.4f}" for g in ("overall", *GROUPS)),
          f"{row['overall ild@10']:.3f}", f"{row['tail ild@10']:.3f}", f"{row['overall tail_share@10']:.3f}",
          f"{row['tail tail_share@10']:.3f}", f"{row['overall miscalibration@10']:.3f}"]
         for row in result["tradeoff"]],
    )
    augmentation = markdown_table(
        ["histories", "augment to", "NDCG@10", "tail NDCG@10"],
        [[row["histories"], str(row["augment_to"]) if row["augment_to"] else "off", f"{row['ndcg@10']:.4f}",
          f"{row['tail_ndcg@10']:.4f}"] for row in result["augmentation"]],
    )
    replay_rows = []
    for name, report in result["replay"].items():
        for group in ("overall", *GROUPS):
            summary = report[group] if group == "overall" else report["groups"][group]
            first = summary["first_hit_step"]
            replay_rows.append([name, group, str(summary["users"]),
                                " / ".join(f"{v:.2f}" for v in summary["cumulative_hits"]),
                                "" if first is None else f"{first:.2f}", f"{summary['no_hit_share']:.3f}",
                                f"{summary['repeat_rate']:.3f}"])
    replays = markdown_table(
        ["variant", "users", "n", "cumulative hits@10 per step", "first-hit step", "no hit", "repeat rate"],
        replay_rows,
    )
    chosen = result["chosen"]
    return (f"item space: {result['item_space']}\n\n{tradeoff}\n\n{augmentation}\n\n"
            f"replay (re-ranker: diversity {chosen['diversity']:g}, repeat penalty {chosen['repeat_penalty']:g}; "
            f"augmentation to {chosen['augment_to']})\n\n{replays}")


def plot_tradeoff(path: Path, result: dict[str, Any]) -> None:
    """NDCG@10 against ILD@10 and against tail-item share, one line per user group along the diversity weights."""
    rows = [row for row in result["tradeoff"] if row["diversity"] != "most-popular"]
    panels = [
        Panel(f"NDCG@10 vs {label}, tail penalty {penalty:g}", label, [
            Series(group, [row[f"{group} {metric}"] for row in mine], [row[f"{group} ndcg@10"] for row in mine])
            for group in ("overall", *GROUPS)
        ])
        for penalty in dict.fromkeys(row["tail_penalty"] for row in rows)
        for mine in [[row for row in rows if row["tail_penalty"] == penalty]]
        for metric, label in (("ild@10", "ILD@10"), ("tail_share@10", "tail-item share@10"))
    ]
    write_line_charts(path, panels)


def add_engagement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a trained model folder (model.pt) or a finished federated run folder")
    parser.add_argument("dataset", help="the dataset the model was trained on (its test split is measured)")
    parser.add_argument("--out", required=True, help="folder for engagement.json and tradeoff.svg")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS),
                        help="diversity weights of the trade-off curve (0: the plain model)")
    parser.add_argument("--tail-penalties", type=float, nargs="+", default=list(TAIL_PENALTIES),
                        help="tail penalties the curve is drawn for (0: the model's scores)")
    parser.add_argument("--augment-to", type=int, nargs="+", default=list(AUGMENT_TO),
                        help="augmentation lengths to measure (0: off)")
    defaults = DiversityOptions()
    parser.add_argument("--diversity", type=float, default=defaults.diversity, help="the replay's MMR weight")
    parser.add_argument("--repeat-penalty", type=float, default=defaults.repeat_penalty,
                        help="the replay's repetition penalty")
    parser.add_argument("--augment", type=int, default=AugmentOptions().augment_to,
                        help="the replay's augmentation length (0: off)")
    parser.add_argument("--steps", type=int, default=STEPS, help="replayed events per user")
    parser.set_defaults(handler=run_arguments)


def run_arguments(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    result = engagement_tables(
        Path(args.model_dir), args.dataset, tuple(args.weights), tuple(args.tail_penalties), tuple(args.augment_to),
        DiversityOptions(args.diversity, args.repeat_penalty), AugmentOptions(args.augment), args.steps,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "engagement.json", result)
    plot_tradeoff(out / "tradeoff.svg", result)
    print(format_tables(result))
    print(f"\nwrote {out / 'engagement.json'}, {out / 'tradeoff.svg'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engagement_arguments(parser)
    raise SystemExit(run_arguments(parser.parse_args()))
