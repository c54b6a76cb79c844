"""Paired statistics for two backends answering the same items.

Pure functions: no I/O, and randomness only through an explicit `seed`.  Scores are proportions in
[0, 1] and differences in [-1, 1]; callers convert to points.  `docs/statistics.md` explains each
number, the verdict rule and the exit codes.

Notation: for binary items, `losses` are items only the reference got right (McNemar's b) and
`gains` items only the candidate got right (McNemar's c); Δ = mean(candidate) - mean(reference).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

VERDICTS = ("consistent", "regression", "improvement", "inconclusive")
EXIT_CODES = {"consistent": 0, "regression": 1, "inconclusive": 3}  # 2 is the CLI's bad-input code

# Bootstrap and sign-flip draws are made in chunks of at most this many cells, so memory stays
# bounded (~32 MiB of indices) whatever n x iters is.
_CHUNK_CELLS = 1 << 22
# Up to this many non-zero paired differences the sign-flip test enumerates all 2^m patterns
# (exact p); above it, Monte Carlo.
_EXACT_SIGN_FLIP_MAX = 16
# Rule of three: with no event in n trials the one-sided 95 % upper bound on the rate is ~3/n.
_RULE_OF_THREE = 3.0


def _z(confidence: float) -> float:
    """Two-sided standard-normal quantile for a `confidence` level in (0, 1)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _as_vector(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _paired(reference: Sequence[float], candidate: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    ref, cand = _as_vector(reference, "reference"), _as_vector(candidate, "candidate")
    if ref.size != cand.size:
        raise ValueError(f"paired vectors differ in length: reference {ref.size}, candidate {cand.size}")
    return ref, cand


def is_binary(values: Sequence[float]) -> bool:
    """True when every value is exactly 0 or 1 (vacuously True for an empty sequence)."""
    arr = np.asarray(values, dtype=float)
    return bool(np.all((arr == 0.0) | (arr == 1.0)))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0 (no information)."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _bootstrap_means(values: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `iters` resamples (with replacement) of `values`."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    n = values.size
    rows = max(1, _CHUNK_CELLS // n)
    means = []
    for start in range(0, iters, rows):
        idx = rng.integers(0, n, size=(min(rows, iters - start), n))
        means.append(values[idx].mean(axis=1))
    return np.concatenate(means)


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(
    values: Sequence[float], confidence: float = 0.95, iters: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval for the mean of graded scores."""
    _z(confidence)
    arr = _as_vector(values, "values")
    return _percentile_interval(_bootstrap_means(arr, iters, np.random.default_rng(seed)), confidence)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: min(1, 2 * P[X <= min(b, c)]) with X ~ Binomial(b + c, 1/2).

    b = items only the reference got right, c = items only the candidate got right; 1.0 when
    b + c == 0.  The tail is summed in exact integer arithmetic, so thousands of discordant pairs
    cost milliseconds and lose no precision.
    """
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"McNemar counts must be non-negative integers, got b={b}, c={c}")
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        tail += term
    return min(1.0, 2 * tail / (1 << n))


def _discordant_counts(ref: np.ndarray, cand: np.ndarray) -> tuple[int, int]:
    """(losses, gains) = (#reference-only correct, #candidate-only correct) of binary vectors."""
    return int(np.sum(ref > cand)), int(np.sum(cand > ref))


def _tango_interval(gains: int, losses: int, n: int, z: float) -> tuple[float, float]:
    """Tango's (1998) score interval for Δ = p_gain - p_loss of paired binary outcomes.

    For each candidate Δ0 the score statistic is (gains - losses - nΔ0) / sqrt(n (2 q + Δ0 (1 - Δ0)))
    with q the maximum-likelihood p_loss under Δ = Δ0 (closed-form root of 2n q² + W q -
    losses·Δ0(1 - Δ0) = 0, W = (2n - gains + losses)Δ0 - (gains + losses)).  The bounds are the Δ0
    where the statistic equals ±z, found by bisection (the statistic falls monotonically in Δ0).
    """

    def excess(delta: float, sign: float) -> float:
        w = (2 * n - gains + losses) * delta - (gains + losses)
        q = (math.sqrt(max(w * w + 8 * n * losses * delta * (1 - delta), 0.0)) - w) / (4 * n)
        variance = max(2 * q + delta * (1 - delta), 0.0)
        return (gains - losses - n * delta) - sign * z * math.sqrt(n * variance)

    def bisect(low: float, high: float, sign: float) -> float:
        for _ in range(64):  # interval of width <= 2 halved 64 times: below double precision
            mid = (low + high) / 2
            if excess(mid, sign) > 0:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    estimate = (gains - losses) / n
    return max(-1.0, bisect(-1.0, estimate, 1.0)), min(1.0, bisect(estimate, 1.0, -1.0))


def paired_difference_ci(
    reference: Sequence[float],
    candidate: Sequence[float],
    confidence: float = 0.95,
    seed: int = 0,
    iters: int = 10_000,
) -> tuple[float, float]:
    """Interval for Δ = mean(candidate) - mean(reference) over paired items.

    Binary scores: Tango's score interval, which depends only on the discordant counts and n and
    keeps close to nominal coverage with few discordant pairs.  With no discordant pair it is
    ±z²/(n + z²) (about ±3.84/n at 95 %), never the degenerate (0, 0).
    Graded scores: percentile bootstrap of the mean paired difference (items resampled, pairs kept
    together).  When every paired difference is 0 the bootstrap would collapse to (0, 0), which at
    small n would pass any equivalence test; the binary zero-discordance band ±z²/(n + z²) is
    returned instead (a difference on an unseen item is at most 1 in size).
    """
    z = _z(confidence)
    ref, cand = _paired(reference, candidate)
    if is_binary(ref) and is_binary(cand):
        losses, gains = _discordant_counts(ref, cand)
        return _tango_interval(gains, losses, ref.size, z)
    if not np.any(cand != ref):
        band = z * z / (ref.size + z * z)
        return (-band, band)
    draws = _bootstrap_means(cand - ref, iters, np.random.default_rng(seed))
    return _percentile_interval(draws, confidence)


def _sign_flip_p(diffs: np.ndarray, iters: int, rng: np.random.Generator) -> float:
    """Two-sided paired permutation p: P(|Σ s_i d_i| >= |Σ d_i|) over random signs s_i = ±1."""
    nonzero = diffs[diffs != 0.0]  # zero differences are unchanged by any sign flip
    m = nonzero.size
    if m == 0:
        return 1.0
    observed = abs(float(nonzero.sum()))
    tolerance = 1e-9 * float(np.abs(nonzero).sum())  # float-summation noise must not break ties
    if m <= _EXACT_SIGN_FLIP_MAX:
        patterns = ((np.arange(1 << m)[:, None] >> np.arange(m)) & 1) * 2 - 1
        return float(np.mean(np.abs(patterns @ nonzero) >= observed - tolerance))
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    rows = max(1, _CHUNK_CELLS // m)
    hits = 0
    for start in range(0, iters, rows):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(rows, iters - start), m))
        hits += int(np.sum(np.abs(signs @ nonzero) >= observed - tolerance))
    return (hits + 1) / (iters + 1)  # the observed labelling counts as one draw; p is never 0


def paired_p_value(
    reference: Sequence[float], candidate: Sequence[float], seed: int = 0, iters: int = 10_000
) -> float:
    """Two-sided p for H0 "no difference": exact McNemar for binary scores, sign-flip test for graded.

    The sign-flip test is exact (full enumeration) with at most 16 non-zero differences and
    Monte Carlo with `iters` draws otherwise.
    """
    ref, cand = _paired(reference, candidate)
    if is_binary(ref) and is_binary(cand):
        losses, gains = _discordant_counts(ref, cand)
        return mcnemar_exact(losses, gains)
    return _sign_flip_p(cand - ref, iters, np.random.default_rng(seed))


def tost_equivalent(ci90: tuple[float, float], margin: float) -> bool:
    """TOST at α = 0.05: equivalent when the 90 % interval lies strictly inside (-margin, +margin)."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    low, high = ci90
    return -margin < low and high < margin


def minimum_detectable_effect(
    reference: Sequence[float], candidate: Sequence[float], alpha: float = 0.05, power: float = 0.8
) -> float:
    """|Δ| a two-sided level-α paired test detects with the given power at this n and discordance.

    MDE = (z_{1-α/2} + z_power) * sqrt(max(Var(d), 3/n) / n) with d_i = candidate_i - reference_i
    and Var the population variance (f - Δ̂² for binary data, f = discordance rate).  The 3/n floor
    is the rule-of-three upper bound on the discordance rate when no discordant pair is seen
    (|d_i| <= 1, so Var(d) <= P(d != 0)): it keeps a run with (almost) no disagreements from
    claiming it could detect arbitrarily small effects.
    """
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")
    ref, cand = _paired(reference, candidate)
    n = ref.size
    variance = max(float(np.var(cand - ref)), _RULE_OF_THREE / n)
    multiplier = _z(1.0 - alpha) + NormalDist().inv_cdf(power)
    return multiplier * math.sqrt(variance / n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values in input order: monotone in the sorted order, capped at 1."""
    ps = [float(p) for p in pvalues]
    for p in ps:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-values must lie in [0, 1], got {p}")
    m = len(ps)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=ps.__getitem__)):
        running = max(running, min(1.0, (m - rank) * ps[index]))
        adjusted[index] = running
    return adjusted


def verdict(
    delta: float,
    ci95: tuple[float, float],
    ci90: tuple[float, float],
    p_holm: float,
    margin: float,
    release_gate: float,
    alpha: float = 0.05,
) -> str:
    """Classify one benchmark row.  All of delta, intervals, margin and gate share one unit.

    First matching rule wins:
      1. delta < -release_gate and ci95 below 0       -> "regression"  (a shown drop beyond the release gate)
      2. ci90 strictly inside (-margin, +margin)       -> "consistent"  (TOST equivalence)
      3. p_holm < alpha and ci95 entirely below 0      -> "regression"
      4. p_holm < alpha and ci95 entirely above 0      -> "improvement"
      5. otherwise                                     -> "inconclusive"
    Rules 3-4 ask the interval to agree with the test, so a row never reads "significant" beside
    a 95 % interval that contains 0; rule 1 likewise needs the paired interval to show a drop, so a
    noisy point estimate past the gate on a few items reads "inconclusive" (the report's gate column
    still says the point estimate failed it).  `release_gate` may be math.inf to switch rule 1 off.
    """
    if release_gate < 0:
        raise ValueError(f"release gate must be >= 0, got {release_gate}")
    if delta < -release_gate and ci95[1] < 0:
        return "regression"
    if tost_equivalent(ci90, margin):
        return "consistent"
    if p_holm < alpha and ci95[1] < 0:
        return "regression"
    if p_holm < alpha and ci95[0] > 0:
        return "improvement"
    return "inconclusive"


def overall_verdict(verdicts: Sequence[str]) -> str:
    """"regression" if any row regressed; "consistent" only if every row is; else "inconclusive".

    An improvement is still a difference, so it makes the run inconclusive rather than consistent;
    an empty list is inconclusive (nothing was shown).
    """
    for v in verdicts:
        if v not in VERDICTS:
            raise ValueError(f"unknown verdict {v!r}; expected one of {', '.join(VERDICTS)}")
    if "regression" in verdicts:
        return "regression"
    if verdicts and all(v == "consistent" for v in verdicts):
        return "consistent"
    return "inconclusive"


def exit_code(overall: str) -> int:
    """Process exit status for an overall verdict: 0 consistent, 1 regression, 3 inconclusive."""
    if overall not in EXIT_CODES:
        raise ValueError(f"no exit code for overall verdict {overall!r}")
    return EXIT_CODES[overall]
