"""``correlated-noise``: would banded matrix-factorisation noise (DP-FTRL, BandMF) beat amplified DP-SGD at the
one-noise recipe's settings?

No training: the error each noise placement leaves in the *prefix sums* of the gradients, the workload SGD's
iterates are (iterate t is the start minus the learning rate times the sum of the first t noisy gradients).
Every user's gradient is clipped to norm 1, each step's noisy sum is divided by its expected batch qN, and the
error is the root mean square over the T prefix sums, per coordinate, in units of 1/N (the user count cancels).

- **DP-SGD** (what ``central`` and ``distributed`` run): every step Poisson-samples users at rate q and adds
  N(0, sigma^2), sigma from ``calibrate_noise`` (PLD) for T steps at rate q. Prefix t carries t independent noises,
  so the RMSE is sigma / q * sqrt((T + 1) / 2).
- **Banded MF** (Choquette-Choo et al. 2023, "Amplified banded matrix factorization"; DP-FTRL of Kairouz et al.
  2021 and Denisov et al. 2022 is its un-banded ancestor): the steps' gradient sums x are released as C x + z with
  C lower-triangular, Toeplitz and b-banded, and the model reads B (C x + z) = A x + B z with A the prefix-sum
  matrix and B = A C^-1: the noise each step adds is correlated with that of the steps before it. RMSE =
  sigma * ||c|| * ||B||_F / sqrt(T) / q, ||c|| being the norm of C's columns. Users are split into b groups by a
  public function of the user; step i Poisson-samples group i mod b at rate q b, so the expected batch is qN as
  for DP-SGD. Columns of C b or more steps apart have disjoint rows, so a user's k = ceil(T / b) steps add up as
  orthogonal vectors, and the release is as private as DP-SGD at rate q b for k steps with noise multiplier sigma
  (their amplification theorem for b-banded C): the same ``calibrate_noise``. b = 1 is DP-SGD itself.
- **Un-amplified** b-min-separation bound: the same release accounted without sampling, a Gaussian of sensitivity
  sqrt(k) ||c|| (``calibrate_noise`` at rate 1). At b = 1/q each step takes its whole group and both bounds agree.

C's b coefficients are optimised (``optimal_bands``), starting from the square-root coefficients (those of
(1 - x)^-1/2, truncated to b and so a banded square root of A, Kalinin & Lampert 2024); both are reported.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.optimize import minimize
from scipy.signal import lfilter

from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import calibrate_noise, epsilon_from_history
from simulations.bench.core import Benchmark, Context
from simulations.report import markdown_table

EPSILONS = (8.0, 1.0)
PASSES = 20
"""The compute budget E = q T: expected steps each user takes part in (``--passes``)."""
MAX_SAMPLE_RATE = 0.5
STEPS = (40, 100, 200, 500, 1000)
FULL_STEPS = (40, 60, 100, 200, 300, 500, 700, 1000)
UNSTABLE = 1e3
"""The optimiser's objective (a log) where c(x) has a root in the unit disk: far above any stable factorisation's."""
MATERIAL = 0.9
"""An error ratio (MF / DP-SGD) at or below which the conclusion calls MF's gain worth having: 10% less noise."""


@dataclass(frozen=True)
class CorrelatedNoisePoint:
    epsilon: float
    passes: int
    """The budget E the sample rate was set from: q = E / T, at most ``MAX_SAMPLE_RATE``."""
    steps: int
    sample_rate: float
    dp_sgd_noise: float
    """Noise multiplier of DP-SGD at ``sample_rate`` for ``steps`` steps (PLD)."""
    dp_sgd_rmse: float
    """Prefix-sum RMSE in units of 1/N, as every RMSE here."""
    bands: int
    """The number of bands b whose amplified MF error is least."""
    mf_noise: float
    """Noise multiplier of that MF: DP-SGD's at rate q b for ceil(T / b) steps."""
    mf_rmse: float
    sqrt_bands_rmse: float
    """The same b with the square-root coefficients instead of the optimised ones."""
    unamplified_bands: int
    unamplified_rmse: float
    """The least MF error over b when no amplification is counted (each group's k steps as a plain Gaussian)."""
    band_rmse: dict[str, float]
    """Amplified MF error per b tried (b = 1 is DP-SGD)."""
    equivalent_epsilon: float
    """The epsilon at which DP-SGD at the same q and T would have MF's error: what correlating the noise is worth."""


def sample_rate(steps: int, passes: int = PASSES) -> float:
    """The recipe's rate for a budget of ``passes`` expected steps per user: passes / T, at most ``MAX_SAMPLE_RATE``."""
    return min(MAX_SAMPLE_RATE, passes / steps)


def band_choices(rate: float) -> tuple[int, ...]:
    """1, 2, 4, ... below 1/q, and floor(1/q): more bands than that would need a group smaller than one batch."""
    largest = math.floor(1 / rate + 1e-9)
    return (*[2**i for i in range(largest.bit_length()) if 2**i < largest], largest)


def toeplitz(column: np.ndarray, steps: int) -> np.ndarray:
    """The steps x steps lower-triangular Toeplitz matrix whose first column starts with ``column``."""
    first = np.zeros(steps)
    first[: min(steps, len(column))] = column[:steps]
    rows, cols = np.indices((steps, steps))
    return np.where(rows >= cols, first[np.clip(rows - cols, 0, None)], 0.0)


def series_of_inverse(polynomial: np.ndarray, steps: int) -> np.ndarray:
    """The first ``steps`` coefficients of 1 / p(x): a lower-triangular Toeplitz matrix's inverse is the one whose
    first column these are, found as the impulse response of the all-pole filter p in O(steps x degree)."""
    return np.asarray(lfilter([1.0], polynomial, np.eye(1, steps)[0]))


def decoder(bands: np.ndarray, steps: int) -> np.ndarray:
    """First column of B = A C^-1, Toeplitz like A and C: the series of 1 / ((1 - x) c(x))."""
    return series_of_inverse(np.convolve(bands, [1.0, -1.0]), steps)


def error_factor(bands: np.ndarray, steps: int) -> float:
    """Prefix-sum RMSE per unit of noise multiplier: ||c|| ||B||_F / sqrt(T) (sqrt((T + 1) / 2) for DP-SGD's [1])."""
    beta = decoder(bands, steps)
    return float(np.linalg.norm(bands) * math.sqrt(np.dot(np.arange(steps, 0, -1), beta**2) / steps))


def sqrt_bands(count: int) -> np.ndarray:
    """(1 - x)^-1/2's first ``count`` coefficients, 1, 1/2, 3/8, ...: C = B = A^1/2 when nothing is cut."""
    coefficients = np.ones(count)
    for j in range(1, count):
        coefficients[j] = coefficients[j - 1] * (2 * j - 1) / (2 * j)
    return coefficients


@cache
def optimal_bands(count: int, steps: int) -> tuple[float, ...]:
    """The b-banded Toeplitz C least in ``error_factor`` (c0 = 1; the factor does not depend on scale), by L-BFGS
    from the square-root coefficients with the exact gradient; never worse than where it started."""
    start = sqrt_bands(count)
    if count == 1:
        return (1.0,)
    weights = np.arange(steps, 0, -1, dtype=float)

    def objective(tail: np.ndarray) -> tuple[float, np.ndarray]:
        bands = np.concatenate(([1.0], tail))
        if np.abs(np.roots(bands[::-1])).min() <= 1.0:
            # C^-1's entries then grow geometrically and overflow at long horizons: a wall the line search backs off
            return UNSTABLE, np.zeros_like(tail)
        beta = decoder(bands, steps)
        squared = float(np.dot(weights, beta**2))
        norm2 = float(np.dot(bands, bands))
        # d beta_j / d c_i = -e_(j-i), e the series of 1 / ((1 - x) c(x)^2)
        e = series_of_inverse(np.convolve(np.convolve(bands, bands), [1.0, -1.0]), steps)
        v = weights * beta
        d_squared = np.array([-2.0 * np.dot(v[i:], e[: steps - i]) for i in range(1, count)])
        value = math.log(norm2) + math.log(squared)
        return value, 2.0 * tail / norm2 + d_squared / squared

    found = minimize(objective, start[1:], jac=True, method="L-BFGS-B")
    best = np.concatenate(([1.0], found.x))
    if error_factor(best, steps) > error_factor(start, steps):
        best = start
    return tuple(float(value) for value in best)


def prefix_sum_rmse(noise: float, rate: float, bands: np.ndarray, steps: int) -> float:
    """In units of 1/N: each step's noise sigma over its expected batch qN, through the factorisation's decoder."""
    return noise / rate * error_factor(bands, steps)


def bench_correlated_noise(epsilons: tuple[float, ...], step_counts: tuple[int, ...], delta: float,
                           passes: int = PASSES) -> list[CorrelatedNoisePoint]:
    points = []
    for epsilon in epsilons:
        for steps in step_counts:
            rate = sample_rate(steps, passes)
            choices = band_choices(rate)
            amplified: dict[int, tuple[float, float]] = {}
            unamplified: dict[int, float] = {}
            for count in choices:
                bands = np.array(optimal_bands(count, steps))
                rounds = math.ceil(steps / count)
                noise = calibrate_noise(epsilon, delta, min(1.0, rate * count), rounds)
                amplified[count] = noise, prefix_sum_rmse(noise, rate, bands, steps)
                unamplified[count] = prefix_sum_rmse(calibrate_noise(epsilon, delta, 1.0, rounds), rate, bands, steps)
            best = min(choices, key=lambda count: amplified[count][1])
            plain = min(choices, key=lambda count: unamplified[count])
            dp_sgd_noise, dp_sgd_rmse = amplified[1]
            matched = dp_sgd_noise * amplified[best][1] / dp_sgd_rmse
            points.append(CorrelatedNoisePoint(
                epsilon, passes, steps, rate, dp_sgd_noise, dp_sgd_rmse, best, amplified[best][0], amplified[best][1],
                prefix_sum_rmse(amplified[best][0], rate, sqrt_bands(best), steps), plain, unamplified[plain],
                {str(count): rmse for count, (_, rmse) in amplified.items()},
                epsilon if best == 1 else epsilon_from_history([(matched, rate, steps)], delta),
            ))
            print(f"  correlated-noise epsilon {epsilon:g} T {steps} q {rate:g}: DP-SGD {dp_sgd_rmse:.1f}, "
                  f"MF b={best} {amplified[best][1]:.1f}", flush=True)
    return points


def run(context: Context) -> list[CorrelatedNoisePoint]:
    passes = context.options.passes
    if passes < 1:
        raise ConfigError(f"--passes {passes}: need at least 1 expected step per user")
    return bench_correlated_noise(EPSILONS, FULL_STEPS if context.full else STEPS, RunSettings.delta, passes)


def add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--passes", type=int, default=PASSES, metavar="E",
                       help="the compute budget: expected steps each user takes part in, q = E / T "
                       "(default: %(default)s)")


def format_table(points: list[CorrelatedNoisePoint]) -> str:
    return markdown_table(
        ["epsilon", "steps T", "sample rate q", "DP-SGD noise multiplier", "DP-SGD prefix-sum RMSE",
         "best bands b", "MF noise multiplier (rate qb, ceil(T/b) steps)", "banded MF RMSE", "MF / DP-SGD",
         "square-root bands RMSE", "un-amplified MF RMSE (b)", "un-amplified / DP-SGD",
         "DP-SGD epsilon at MF's error"],
        [[f"{p.epsilon:g}", str(p.steps), f"{p.sample_rate:g}", f"{p.dp_sgd_noise:.3f}", f"{p.dp_sgd_rmse:.1f}",
          str(p.bands), f"{p.mf_noise:.3f}", f"{p.mf_rmse:.1f}", f"{p.mf_rmse / p.dp_sgd_rmse:.2f}",
          f"{p.sqrt_bands_rmse:.1f}", f"{p.unamplified_rmse:.1f} ({p.unamplified_bands})",
          f"{p.unamplified_rmse / p.dp_sgd_rmse:.2f}", f"{p.equivalent_epsilon:.2f}"] for p in points],
    )


def conclusion(points: list[CorrelatedNoisePoint]) -> str:
    """Per epsilon, where MF's error is at least 10% below DP-SGD's and what DP-SGD would need to match it."""
    lines = []
    for epsilon in dict.fromkeys(p.epsilon for p in points):
        mine = [p for p in points if p.epsilon == epsilon]
        ratios = [p.mf_rmse / p.dp_sgd_rmse for p in mine]
        gains = [p for p, ratio in zip(mine, ratios, strict=True) if ratio <= MATERIAL]
        where = (
            "nowhere" if not gains else
            "at " + ", ".join(f"T = {p.steps} ({p.mf_rmse / p.dp_sgd_rmse:.2f}: DP-SGD's error at epsilon "
                              f"{p.equivalent_epsilon:.1f})" for p in gains)
        )
        lines.append(f"At epsilon {epsilon:g} and {mine[0].passes} passes, banded MF's prefix-sum error is "
                     f"{min(ratios):.2f} to {max(ratios):.2f} of DP-SGD's; at least {1 - MATERIAL:.0%} below it "
                     f"{where}.")
    return " ".join(lines)


BENCHMARK = Benchmark(
    name="correlated-noise",
    help="banded matrix-factorisation noise (DP-FTRL) against amplified DP-SGD at the one-noise recipe's settings: "
    "error of the noisy prefix sums of the gradients, no training (--full: more step counts)",
    description=f"At epsilon {' and '.join(f'{e:g}' for e in EPSILONS)} (delta 1e-5) and a budget of E expected "
    f"steps per user (`--passes`, default {PASSES}; q = E/T, at most {MAX_SAMPLE_RATE}), the root-mean-squared "
    "error of the "
    "noisy prefix sums of the gradients (what SGD's iterates are), per coordinate, clip 1, each step's sum divided "
    "by its expected batch qN, in units of 1/N. DP-SGD: Poisson sampling at rate q, noise from the PLD "
    "calibration for T steps. Banded MF: a b-banded Toeplitz correlation C optimised for prefix sums, users in b "
    "groups, step i sampling group i mod b at rate qb (the same expected batch), accounted as DP-SGD at rate qb for "
    "ceil(T/b) steps (Choquette-Choo et al. 2023); b from 1, 2, 4, ... and floor(1/q), the best shown. "
    "Square-root bands: the truncated coefficients of (1-x)^(-1/2) at the same b. Un-amplified: the same "
    "factorisations accounted without sampling (a Gaussian on each user's ceil(T/b) steps), best b. Ratios below "
    "1 are where MF would have less noise.",
    result=CorrelatedNoisePoint,
    run=run,
    format_table=format_table,
    conclusion=conclusion,
    add_options=add_options,
)
