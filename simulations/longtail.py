"""Long-tail table for a saved model: ``python -m simulations.longtail MODEL_DIR DATASET [--max-len N]``.

Rows: most-popular, the plain model, the model with tail penalties, and the
cold-start blend on histories cut to their last 1 and 3 items (what a new user
shows). Columns: NDCG@10 per user group and overall, coverage@10, tail-item
share@10. The prior is the model's own (``common.recommender.ranking.model_prior``), so
every row is servable without private statistics; most-popular uses the
training data's popularity, as the baseline always does. When the model was
trained from content (its ``item_vectors.pt``) or ``--item-text`` names public
metadata, rows with the content cold-start prior are added.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from common.data.datasets import load_dataset
from common.data.split import EvaluationCases, evaluation_cases, item_popularity
from common.recommender.artifacts import load_model
from common.recommender.content import item_content_vectors, load_item_vectors
from common.recommender.evaluation import evaluate, model_scorer, popularity_scorer, reranked_scorer
from common.recommender.model import PADDING_INDEX
from common.recommender.ranking import RankingOptions, model_prior
from common.recommender.training import pick_device
from common.utils.files import write_json
from simulations.report import markdown_table

TAIL_PENALTIES = (0.2, 0.5)
COLD_START = RankingOptions(cold_start_weight=0.5, cold_start_fade=5, tail_penalty=0.0)
CONTENT_COLD_START = RankingOptions(cold_start_weight=0.5, cold_start_fade=5, tail_penalty=0.0,
                                    cold_start_prior="content")
SHORT_HISTORIES = (1, 3)


def last_items(cases: EvaluationCases, keep: int) -> EvaluationCases:
    """The same cases as if each user had shown only their last ``keep`` items (exclusions cut to match)."""
    inputs = cases.inputs.clone()
    inputs[:, :-keep] = PADDING_INDEX
    return replace(cases, inputs=inputs, histories=[h[-keep:] for h in cases.histories])


def longtail_table(
    model_dir: Path, dataset_spec: str, max_len: int | None = None, item_text: Path | None = None
) -> list[dict[str, Any]]:
    device = pick_device()
    model, catalog = load_model(model_dir, device=device)
    dataset, _ = load_dataset(dataset_spec).restricted_to(catalog)
    _, sequences = dataset.sequences(catalog)
    cases = evaluation_cases(sequences, "test", max_len or model.config.max_len)
    popularity = item_popularity(sequences, catalog.num_items)
    prior = model_prior(model)
    plain = model_scorer(model, device)
    vectors = load_item_vectors(model_dir, catalog.num_items)
    if vectors is None and item_text is not None:
        vectors = item_content_vectors(catalog, item_text, model.config.hidden)
    blends = [("cold-start blend", reranked_scorer(plain, prior, COLD_START))]
    if vectors is not None:
        blends.append(("content cold-start blend", reranked_scorer(plain, prior, CONTENT_COLD_START, vectors)))
    variants: list[tuple[str, Any, EvaluationCases]] = [
        ("most-popular", popularity_scorer(popularity), cases),
        ("SASRec", plain, cases),
        *[(f"SASRec + tail penalty {p:g}", reranked_scorer(plain, prior, RankingOptions(tail_penalty=p)), cases)
          for p in TAIL_PENALTIES],
        # Full histories: the content blend only (blends[0], the model's own prior, only matters when cut short).
        *[(f"SASRec + {name}", scorer, cases) for name, scorer in blends[1:]],
    ]
    for keep in SHORT_HISTORIES:
        short = last_items(cases, keep)
        variants += [
            (f"SASRec, last {keep} item(s) only", plain, short),
            *[(f"SASRec + {name}, last {keep} item(s) only", scorer, short) for name, scorer in blends],
        ]
    rows = []
    for name, scorer, variant_cases in variants:
        report = evaluate(scorer, variant_cases, popularity, len(sequences))
        rows.append({
            "variant": name,
            "ndcg@10": report["overall"]["ndcg@10"],
            **{f"{group}_ndcg@10": report["groups"][group]["ndcg@10"] for group in ("tail", "torso", "head")},
            "coverage@10": report["items"]["coverage@10"],
            "tail_share@10": report["items"]["tail_share@10"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("dataset")
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--item-text", default=None,
                        help="public item metadata for the content cold-start prior, when the model folder has no "
                        "item_vectors.pt (same formats as fedtail train --item-text)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = longtail_table(
        Path(args.model_dir), args.dataset, args.max_len, Path(args.item_text) if args.item_text else None
    )
    print(markdown_table(
        ["variant", "NDCG@10", "tail", "torso", "head", "coverage@10", "tail-item share@10"],
        [[row["variant"], *(f"{row[key]:.4f}" for key in ("ndcg@10", "tail_ndcg@10", "torso_ndcg@10", "head_ndcg@10")),
          f"{row['coverage@10']:.3f}", f"{row['tail_share@10']:.3f}"] for row in rows],
    ))
    if args.out:
        write_json(Path(args.out), {"model_dir": args.model_dir, "dataset": args.dataset, "rows": rows})


if __name__ == "__main__":
    main()
