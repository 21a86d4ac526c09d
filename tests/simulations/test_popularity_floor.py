"""The popularity floor and frozen item tables through Flower's real simulation engine: the query before round 1,
the sites' round-0 ledger lines, the output bias and the prior, frozen tables kept exactly, and the audit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.federation import RunSettings
from common.privacy.popularity import popularity_step
from common.recommender.artifacts import load_model
from common.recommender.content import initialise_items, load_item_vectors
from common.recommender.item_tables import ITEM_TABLE_PARAMETERS
from common.recommender.model import SASRec
from common.run_files import read_rounds
from server.popularity import POPULARITY_PRIOR_FILE, load_popularity
from server.serving import Recommender
from simulations.audit import audit
from simulations.simulate import Resources, simulate
from tests.ledgers import fresh_pld_epsilon
from tests.simulations.test_simulate import SMALL


def test_a_federation_with_the_popularity_floor_and_frozen_items_charges_both_and_keeps_the_tables(
    tmp_path: Path,
) -> None:
    attributes = tmp_path / "Synthetic_item2attributes.json"  # public content: item -> attribute ids
    attributes.write_text(json.dumps({str(item): [item % 7, 10 + item % 5, 20 + item % 3] for item in range(1, 91)}))
    out = tmp_path / "run"
    settings = RunSettings(**{**SMALL, "epsilon": 4.0}, item_text=str(attributes), item_tables="frozen",
                           popularity_share=0.3, server_optimizer="fedadam", out_dir=str(out))
    summary = simulate(settings, Resources(sites=2))

    for site in ("0", "1"):
        lines = [json.loads(line) for line in (out / "ledgers" / f"site-{site}.jsonl").read_text().splitlines()]
        assert [line["round"] for line in lines] == [0, 1, 2], "the release is the site's round 0"
        assert (lines[0]["sample_rate"], lines[0]["steps"]) == (1.0, 1)
        recomputed = fresh_pld_epsilon(lines, settings.delta)
        assert summary["privacy"]["per_site"][site] == pytest.approx(recomputed)
        assert recomputed <= 4.0 and recomputed == pytest.approx(4.0, abs=0.05), "the target covers both"
    floor_report = summary["privacy"]["popularity_floor"]
    assert floor_report["share_of_target_epsilon"] == 0.3 and floor_report["sites"] == ["0", "1"]
    assert [r.site_ledger_head["0"]["lines"] for r in read_rounds(out)] == [2, 3]

    floor = load_popularity(out)
    assert floor is not None and floor.noisy_sum.shape == (91,)
    model, catalog = load_model(out)
    torch.manual_seed(settings.seed)  # the initial model, as the server built it
    initial = SASRec(settings.model_config(catalog.num_items))
    vectors = load_item_vectors(out, catalog.num_items)
    assert vectors is not None
    initialise_items(initial, vectors)
    for name in ITEM_TABLE_PARAMETERS:
        assert torch.equal(model.state_dict()[name], initial.state_dict()[name]), name
    prior = torch.load(out / POPULARITY_PRIOR_FILE, weights_only=True)
    torch.testing.assert_close(prior, floor.prior())
    assert torch.equal(Recommender.load(out, torch.device("cpu")).prior, prior), "the cold-start prior is the floor"
    report = audit([out])
    assert report.passed and report.witnessed, [str(f) for f in report.findings]
    assert report.epsilon == pytest.approx(summary["privacy"]["epsilon"])
    selection = summary["privacy"]["model_selection"]
    evaluated = [r.round for r in read_rounds(out) if r.valid is not None]
    assert selection["candidate_rounds"] == len(evaluated) + 1, "round 0, the floor alone, is a candidate too"
    assert selection["kept_round"] in [0, *evaluated]


def test_under_distributed_noise_the_floor_is_one_secure_sum_and_each_ledger_records_its_share(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    settings = RunSettings(**{**SMALL, "rounds": 1, "batch_size": 120}, noise="distributed", min_sites=3,
                           secure_aggregation_tolerated=1, sample_rate=0.5, popularity_share=0.3, out_dir=str(out))
    summary = simulate(settings, Resources(sites=3))

    sigma = popularity_step(settings.epsilon, settings.delta, 0.3)[0]
    for site in ("0", "1", "2"):
        [release, *_] = [json.loads(line) for line in (out / "ledgers" / f"site-{site}.jsonl").read_text().splitlines()]
        assert release["round"] == 0 and release["noise_placement"] == "distributed"
        shares = 3 - 1  # the simulated sites' node config: the secure sum's threshold
        assert release["share_noise_multiplier"] == pytest.approx(sigma / math.sqrt(shares))
        assert release["fallback_epsilon_so_far"] > release["epsilon_so_far"]
    floor_report = summary["privacy"]["popularity_floor"]
    assert "secure aggregation" in floor_report["mechanism"] and floor_report["sites"] == ["0", "1", "2"]
    floor = load_popularity(out)
    assert floor is not None and floor.secure_sum and float(floor.noisy_sum.abs().sum()) > 0
    report = audit([out])
    assert report.passed, [str(f) for f in report.findings]
