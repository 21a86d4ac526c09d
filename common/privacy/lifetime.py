"""Splitting a lifetime budget over time windows.

A lifelong run trains one run per time window on the same users, so their spend composes (the sites' ledgers
are shared across windows). With a lifetime cap L over W identical windows, each window is asked the epsilon
at which W such windows compose to at most L: under RDP or PLD that is more than L / W (composition is sublinear), so
splitting evenly in epsilon would waste budget.
"""

from __future__ import annotations

from common.privacy.accounting import calibrate_noise, epsilon_from_history

SHRINK = 0.995


def window_epsilon(lifetime: float, windows: int, delta: float, sample_rate: float, steps_per_window: int) -> float:
    """The per-window target at which ``windows`` windows (each calibrated on its own target, as a site does)
    compose to at most ``lifetime``."""
    sigma = calibrate_noise(lifetime, delta, sample_rate, steps_per_window * windows)
    target = epsilon_from_history([(sigma, sample_rate, steps_per_window)], delta)
    while lifetime_spend(target, windows, delta, sample_rate, steps_per_window) > lifetime:
        target *= SHRINK  # calibration's tolerance may give slightly less noise than sigma
    return target


def lifetime_spend(target: float, windows: int, delta: float, sample_rate: float, steps_per_window: int) -> float:
    """Epsilon after ``windows`` windows, each calibrated by the sites on ``target`` (what their ledgers compose)."""
    sigma = calibrate_noise(target, delta, sample_rate, steps_per_window)
    return epsilon_from_history([(sigma, sample_rate, steps_per_window)] * windows, delta)
