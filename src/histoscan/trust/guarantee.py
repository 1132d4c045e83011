"""A referral limit with a finite-sample guarantee: Learn-then-Test with fixed-sequence testing.

A referral rule answers an image when its doubt is at most a limit ``lam``. For a target (an accuracy of the
answered images, or a sensitivity among the answered tumour images) the risk of a limit is the error rate the
target bounds: errors among the answered (accuracy), or missed tumours among the answered tumours
(sensitivity). Learn-then-Test (Angelopoulos, Bates, Candes, Jordan and Lei, 2021) turns the choice of ``lam``
into multiple testing: for each limit of a grid fixed before the data is seen, the null hypothesis "the risk at
``lam`` is above ``alpha`` = 1 - target" is tested with a p-value, and the limits whose nulls are rejected with
family-wise error at most ``delta`` are certified. With probability at least 1 - delta over the draw of the
fitting rows, every certified limit has risk at most ``alpha`` on new images of the same distribution.

- **p-value.** Conditionally on which rows a limit answers (and, for sensitivity, which of them are tumours),
  the errors among them are independent Bernoulli draws with the limit's risk as their mean, so the exact
  binomial tail ``P(Binomial(n, alpha) <= errors)`` is a valid p-value (the Hoeffding-Bentkus p-value is for
  losses that are not 0/1; for 0/1 losses the binomial tail is exact and never larger).
- **Fixed-sequence testing from several starts.** The grid is ordered from the most conservative limit
  (answering fewest) to the least. From each of a few start points fixed in advance, the limits are tested in
  that order at level ``delta / starts``, stopping at the first that is not rejected; a limit is certified when
  any chain rejects it (Bonferroni across chains, no split within one: LTT's fixed-sequence testing with
  multiple start points). One chain from the most conservative end would stall where a limit answers too few
  images to reject anything (at 0 errors, ``n`` must exceed ``log(delta) / log(1 - alpha)``), which depends on
  how confident the model is; the starts spread over the grid keep the test from stopping there. The rule
  keeps the least conservative certified limit: the most images answered that the test certifies.

Why by hand: the arithmetic is scipy's binomial tail and a loop of a few lines. MAPIE's Learn-then-Test
(``mapie.control_risk``) controls the unconditional risk of a threshold with Bonferroni over the grid (not the
risk among the answered images, not fixed-sequence), and would bring a dependency for these few lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the calibrated margins tried, in logits, most conservative (answering fewest) first: fixed before any data
MARGIN_GRID = np.round(np.arange(800, -1, -1) / 100.0, 2)  # 8.00, 7.99, ..., 0.00
MARGIN_STARTS = (6.0, 4.0, 3.0, 2.0, 1.0)
#: limits of 1 - top probability (multi-class) and of the TTA / member spread, least (most conservative) first
TOP_PROBABILITY_GRID = np.round(np.arange(0, 1001) / 1000.0, 3)
TOP_PROBABILITY_STARTS = (0.001, 0.01, 0.05, 0.15, 0.4)
UNCERTAINTY_GRID = np.round(np.arange(0, 1001) / 2000.0, 4)
UNCERTAINTY_STARTS = (0.002, 0.01, 0.03, 0.1, 0.3)

LEARN_THEN_TEST = "learn-then-test"
EMPIRICAL = "empirical"


@dataclass(frozen=True)
class Certified:
    """The outcome of the test: the chosen limit (None: none certified) and the evidence at it."""

    limit: float | None
    p_value: float  # at the chosen limit (at the first limit tested when none is certified)
    answered: int  # rows the risk counts at the chosen limit (all answered, or answered tumours)
    errors: int  # errors among them
    tested: int  # how many limits were tested before the sequence stopped


def binomial_p_value(errors: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """``P(Binomial(n, alpha) <= errors)``: the p-value of "risk > alpha" after ``errors`` in ``n`` (1 where n = 0)."""
    from scipy.stats import binom  # scipy only where a rule is fitted

    e, m = np.asarray(errors), np.asarray(n)
    return np.where(m > 0, binom.cdf(e, np.maximum(m, 1), alpha), 1.0)


def counts_at(doubt: np.ndarray, wrong: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each limit: how many rows have doubt <= limit, and how many of them are wrong."""
    order = np.argsort(doubt, kind="stable")
    d, w = np.asarray(doubt, dtype=np.float64)[order], np.asarray(wrong, dtype=bool)[order]
    n = np.searchsorted(d, limits, side="right")
    cum = np.concatenate([[0], np.cumsum(w)])
    return n, cum[n]


def start_indices(grid: np.ndarray, starts: Sequence[float]) -> list[int]:
    """Where each start value sits in ``grid`` (the nearest grid point)."""
    return sorted({int(np.argmin(np.abs(np.asarray(grid) - v))) for v in starts})


def certify(
    doubt: np.ndarray,
    wrong: np.ndarray,
    limits: np.ndarray,
    alpha: float,
    delta: float,
    starts: Sequence[int] = (0,),
) -> Certified:
    """Fixed-sequence Learn-then-Test over ``limits`` (most conservative first) from ``starts``: see the module text.

    ``doubt`` and ``wrong`` are the rows the risk counts (every row for accuracy, the tumour rows for
    sensitivity): a row is answered at limit ``lam`` when its doubt is at most ``lam``. ``starts``: indices of
    ``limits`` where a chain begins; each chain is tested at ``delta / len(starts)``.
    """
    grid = np.asarray(limits, dtype=np.float64)
    n, k = counts_at(doubt, wrong, grid)
    p = binomial_p_value(k, n, alpha)
    level = delta / len(starts)
    best, tested = -1, 0
    for s in starts:
        failed = np.flatnonzero(p[s:] > level)
        stop = s + int(failed[0]) if len(failed) else len(grid)  # the chain stops at its first non-rejection
        tested += min(stop + 1, len(grid)) - s
        if stop > s:
            best = max(best, stop - 1)  # the chain's last rejection
    if best < 0:
        j = min(starts)
        return Certified(None, float(p[j]), int(n[j]), int(k[j]), tested)
    return Certified(float(grid[best]), float(p[best]), int(n[best]), int(k[best]), tested)


def coverage_margin(n: int, delta: float) -> float:
    """Dvoretzky-Kiefer-Wolfowitz (Massart): the coverage of every limit at once is within this of its fitted value.

    With probability at least 1 - delta over the fitting rows, uniformly over limits, so it holds for the
    limit chosen on them too.
    """
    return float(np.sqrt(np.log(2.0 / delta) / (2.0 * n)))
