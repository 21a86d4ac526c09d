"""The correlated-noise benchmark's numbers: the factorisation, its error, its sensitivity and its accounting."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from common.privacy.accounting import calibrate_noise
from simulations import cli
from simulations.bench import correlated_noise as mf

DELTA = 1e-5


def prefix_sums(steps: int) -> np.ndarray:
    return np.tril(np.ones((steps, steps)))


@pytest.mark.parametrize("bands", [mf.sqrt_bands(3), np.array(mf.optimal_bands(4, 12)), np.array([1.0])])
def test_the_decoder_times_the_banded_factor_is_the_prefix_sum_matrix(bands: np.ndarray) -> None:
    steps = 12
    factor = mf.toeplitz(bands, steps)
    assert np.allclose(mf.toeplitz(mf.decoder(bands, steps), steps) @ factor, prefix_sums(steps), atol=1e-12)
    assert np.count_nonzero(np.diag(factor, -len(bands))) == 0, "C has exactly b bands"


def test_uncut_square_root_coefficients_square_to_the_prefix_sum_matrix() -> None:
    root = mf.toeplitz(mf.sqrt_bands(9), 9)
    assert np.allclose(root @ root, prefix_sums(9), atol=1e-12)
    assert mf.sqrt_bands(4).tolist() == [1.0, 0.5, 0.375, 0.3125]


def test_the_error_factor_by_hand_and_against_dense_matrices() -> None:
    # T = 2, C = [[1, 0], [1/2, 1]]: B = A C^-1 = [[1, 0], [1/2, 1]], ||B||_F^2 = 9/4, column norm^2 = 5/4
    assert mf.error_factor(np.array([1.0, 0.5]), 2) == pytest.approx(math.sqrt(5 / 4 * 9 / 4 / 2))
    for steps in (1, 2, 7, 50):
        assert mf.error_factor(np.array([1.0]), steps) == pytest.approx(math.sqrt((steps + 1) / 2)), "DP-SGD's"
    bands = np.array([1.0, 0.6, -0.1, 0.2])
    dense = prefix_sums(30) @ np.linalg.inv(mf.toeplitz(bands, 30))
    assert mf.error_factor(bands, 30) == pytest.approx(np.linalg.norm(bands) * np.linalg.norm(dense) / math.sqrt(30))


def test_the_error_factor_is_the_rmse_of_noisy_prefix_sums_drawn() -> None:
    """The mechanism run on noise alone: release C x + z, decode with B, compare the prefix sums with A x."""
    steps, draws, bands = 16, 20_000, np.array(mf.optimal_bands(4, 16))
    generator = np.random.default_rng(0)
    x = generator.normal(size=(steps, 1))
    noise = generator.normal(size=(steps, draws)) * np.linalg.norm(bands)  # the noise scales with C's column norm
    released = mf.toeplitz(bands, steps) @ x + noise
    error = mf.toeplitz(mf.decoder(bands, steps), steps) @ released - prefix_sums(steps) @ x
    assert math.sqrt(np.mean(error**2)) == pytest.approx(mf.error_factor(bands, steps), rel=0.02)


def test_a_users_sensitivity_is_the_column_norm_times_the_root_of_its_participations() -> None:
    """What the accounting rests on: for every participation pattern b steps apart and any gradients of norm 1,
    ||C X||_F^2 is at most k ||c||^2, k = ceil(T / b); columns b or more apart are orthogonal."""
    steps, count = 10, 3
    bands = np.array(mf.optimal_bands(count, steps))
    factor = mf.toeplitz(bands, steps)
    gram = factor.T @ factor
    apart = np.abs(np.subtract.outer(np.arange(steps), np.arange(steps))) >= count
    assert np.allclose(gram[apart], 0.0) and not np.allclose(gram[~apart], 0.0)
    assert np.sqrt(np.diag(gram)).max() == pytest.approx(np.linalg.norm(bands))
    worst = 0.0
    for size in range(1, steps + 1):
        for chosen in itertools.combinations(range(steps), size):
            if any(b - a < count for a, b in itertools.pairwise(chosen)):
                continue
            for signs in itertools.product((-1.0, 1.0), repeat=size):
                contribution = np.zeros(steps)
                contribution[list(chosen)] = signs
                worst = max(worst, float(np.sum((factor @ contribution) ** 2)))
    bound = math.ceil(steps / count) * np.dot(bands, bands)
    # steps 0, 3, 6, 9: three whole columns and the last one, cut to its first coefficient, and no cross terms
    assert worst == pytest.approx(3 * np.dot(bands, bands) + bands[0] ** 2) and worst <= bound


def test_optimised_bands_beat_the_square_root_ones_and_a_grid_search() -> None:
    for count in (2, 4, 8):
        assert mf.error_factor(np.array(mf.optimal_bands(count, 100)), 100) < mf.error_factor(mf.sqrt_bands(count), 100)
    grid = min(mf.error_factor(np.array([1.0, c]), 1000) for c in np.linspace(0.01, 0.99, 99))
    assert mf.error_factor(np.array(mf.optimal_bands(2, 1000)), 1000) <= grid + 1e-9
    assert mf.optimal_bands(1, 50) == (1.0,)


def test_band_choices_keep_one_groups_batch_at_most_the_whole_group() -> None:
    assert mf.band_choices(0.5) == (1, 2)
    assert mf.band_choices(0.02) == (1, 2, 4, 8, 16, 32, 50)
    assert mf.band_choices(0.03) == (1, 2, 4, 8, 16, 32, 33)
    assert mf.band_choices(1.0) == (1,)
    assert all(rate * b <= 1 + 1e-12 for rate in (0.5, 0.2, 0.03, 0.02, 0.007) for b in mf.band_choices(rate))
    assert [mf.sample_rate(steps) for steps in (20, 40, 100, 1000)] == [0.5, 0.5, 0.2, 0.02]
    assert mf.sample_rate(1000, passes=5) == 0.005


def test_a_budget_below_one_pass_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "correlated-noise", "--passes", "0", "--out", str(tmp_path)]) == 2
    assert "--passes 0: need at least 1 expected step per user" in capsys.readouterr().err


def test_the_unamplified_bound_is_the_gaussian_of_sensitivity_root_k() -> None:
    """Rate 1 through the PLD accountant is the plain Gaussian mechanism composed k times: mu = sqrt(k) / sigma,
    delta(epsilon) by Balle & Wang's exact formula; calibration lands within its tolerance below the target."""
    epsilon, participations = 2.0, 20
    sigma = calibrate_noise(epsilon, DELTA, 1.0, participations)
    mu = math.sqrt(participations) / sigma

    def delta(at: float) -> float:
        return float(norm.cdf(-at / mu + mu / 2) - math.exp(at) * norm.cdf(-at / mu - mu / 2))

    assert delta(epsilon) <= DELTA * 1.01 and delta(epsilon - 0.02) >= DELTA


def test_with_one_band_mf_is_dp_sgd_and_more_bands_help_at_epsilon_8(capsys: pytest.CaptureFixture[str]) -> None:
    (point,) = mf.bench_correlated_noise((8.0,), (100,), DELTA)
    dp_sgd_noise = calibrate_noise(8.0, DELTA, 0.2, 100)
    assert point.dp_sgd_noise == dp_sgd_noise
    assert point.band_rmse["1"] == point.dp_sgd_rmse == pytest.approx(dp_sgd_noise / 0.2 * math.sqrt(101 / 2))
    assert set(point.band_rmse) == {"1", "2", "4", "5"} and point.mf_rmse == min(point.band_rmse.values())
    assert point.bands > 1 and point.mf_rmse < point.dp_sgd_rmse, "at epsilon 8 and 100 steps some correlation pays"
    assert point.mf_noise == calibrate_noise(8.0, DELTA, 0.2 * point.bands, math.ceil(100 / point.bands))
    assert point.sqrt_bands_rmse >= point.mf_rmse and point.equivalent_epsilon > 8.0
    assert point.unamplified_bands == 5, "without amplification the most bands, fewest participations, win"
    table = mf.format_table([point])
    assert point.passes == mf.PASSES and "| 8 | 100 | 0.2 |" in table
    assert "At epsilon 8 and 20 passes, banded MF's prefix-sum error is" in mf.conclusion([point])
    assert "correlated-noise epsilon 8 T 100" in capsys.readouterr().out
