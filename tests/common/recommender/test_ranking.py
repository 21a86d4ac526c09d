"""Long-tail re-ranking: off changes nothing, the cold-start blend fades, the tail penalty lifts rare items,
the content prior favours items like the user's."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from common.recommender.model import ModelConfig, SASRec
from common.recommender.ranking import RankingOptions, content_prior, model_prior, rerank, unit_rows

PRIOR = torch.tensor([0.0, 0.7, 0.2, 0.1])  # index 0 is padding


def test_off_by_default_returns_the_scores_untouched() -> None:
    scores = torch.randn(3, 4)
    assert rerank(scores, torch.tensor([0, 2, 9]), PRIOR, RankingOptions(tail_penalty=0.0)) is scores


def test_the_cold_start_blend_is_the_prior_at_zero_items_and_gone_at_the_fade() -> None:
    scores = torch.tensor([[0.0, -5.0, -5.0, 5.0]] * 3)  # the model is sure of item 3
    options = RankingOptions(cold_start_weight=1.0, cold_start_fade=4, tail_penalty=0.0)
    ranked = rerank(scores, torch.tensor([0, 2, 4]), PRIOR, options)
    assert torch.argmax(ranked[0, 1:]) + 1 == 1  # empty history: the prior's favourite
    torch.testing.assert_close(ranked[2], torch.log_softmax(scores[2], dim=0))  # faded out: the model alone
    half = ranked[1].exp()
    torch.testing.assert_close(half, 0.5 * torch.softmax(scores[1], dim=0) + 0.5 * PRIOR.clamp(min=1e-12))


def test_the_tail_penalty_moves_rare_items_up() -> None:
    scores = torch.log(torch.tensor([[1e-9, 0.5, 0.3, 0.2]]))

    def order(penalty: float) -> torch.Tensor:
        reranked = rerank(scores, torch.tensor([5]), PRIOR, RankingOptions(tail_penalty=penalty))
        return torch.argsort(reranked[0, 1:], descending=True)

    plain, lifted = order(0.0), order(1.0)
    assert plain.tolist() == [0, 1, 2] and lifted.tolist()[0] == 2  # item 3, the rarest, comes first


def test_the_model_prior_is_a_distribution_without_padding() -> None:
    prior = model_prior(SASRec(ModelConfig(num_items=12, max_len=4, hidden=8, heads=1, blocks=1)))
    assert prior.shape == (13,) and prior[0] == 0 and float(prior.sum()) == pytest.approx(1.0)


def test_the_content_prior_favours_items_like_the_users_and_falls_back_without_history() -> None:
    # Items 1-3 share one content direction, items 4-6 another; item 7 has no content (zero row).
    vectors = torch.zeros(8, 2)
    vectors[1:4, 0] = 1.0
    vectors[4:7, 1] = 1.0
    fallback = torch.full((8,), 1 / 7)
    fallback[0] = 0.0
    inputs = torch.tensor([[0, 0, 1], [0, 5, 6], [0, 0, 0], [0, 0, 7]])  # left-padded histories
    prior = content_prior(inputs, unit_rows(3.0 * vectors), fallback, temperature=0.1)  # length does not matter
    assert prior.shape == (4, 8)
    torch.testing.assert_close(prior.sum(dim=1), torch.ones(4))
    assert torch.all(prior[:, 0] == 0), "padding is never recommended"
    assert float(prior[0, 2]) > 100 * float(prior[0, 5]), "like item 1: items 2-3, not 4-6"
    assert float(prior[1, 4]) > 100 * float(prior[1, 1])
    torch.testing.assert_close(prior[2], fallback)  # no history
    torch.testing.assert_close(prior[3], fallback)  # a history without content

    scores = torch.zeros(2, 8)
    blended = rerank(scores, torch.tensor([1, 2]), fallback, RankingOptions(cold_start_weight=1.0, tail_penalty=0.0),
                     prior[:2])
    assert torch.argmax(blended[0, 1:]) + 1 in (1, 2, 3) and torch.argmax(blended[1, 1:]) + 1 in (4, 5, 6)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError):
        RankingOptions(cold_start_weight=1.5)
    with pytest.raises(ConfigError):
        RankingOptions(tail_penalty=-1)
    with pytest.raises(ConfigError, match="cold-start prior 'text'"):
        RankingOptions(cold_start_prior="text")
    with pytest.raises(ConfigError, match="temperature"):
        RankingOptions(content_temperature=0.0)
