"""Learn-then-Test calibration of an early-exit threshold with a statistical guarantee.

This is the calibration step of CALM (Schuster et al. 2022, "Confident Adaptive Language
Modeling"), done with Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021).

The user states a risk tolerance ``delta`` (for "token consistency with the full model
>= 0.95", the loss is inconsistency and ``delta = 1 - 0.95``) and a failure probability
``epsilon``. Each candidate threshold ``lambda_j`` gets a valid p-value for the null
hypothesis ``H0_j: R(lambda_j) > delta``. The candidates are tested in a FIXED SEQUENCE,
from the strictest (safest, least exiting) to the loosest, and testing stops at the
first candidate that is not rejected at level ``epsilon``. The chosen threshold is the
last rejected one, the loosest still certified.

Guarantee: with probability >= 1 - epsilon over the draw of the calibration set,
``R(chosen) <= delta`` on data exchangeable with the calibration examples.

The losses must be per independent EXAMPLE (one sequence or one token window), each in
[0, 1], so ``n`` is the number of examples, never the number of tokens: tokens inside
one window are not independent, and counting them as separate examples makes the
p-values far too small. `learn_then_test` therefore takes a matrix
``losses[n_lambdas, n_examples]`` and uses ``n = n_examples``; to control a token-level
rate, give each window its own fraction of inconsistent tokens (a loss in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from dyninfer.core.errors import DyninferError

METHODS = ("auto", "binomial", "hoeffding-bentkus", "betting")
# The p-value each kind of loss gets, fixed by what the loss is, before any is seen (the certifiers pass these):
# shares in [0, 1] (inconsistent tokens, lost value, disagreeing positions) are bet on; 0/1 losses (a right
# answer lost) get the exact binomial test. "auto" decides from the values instead (binomial when all are 0 or 1),
# which is exact only when the loss is 0/1 by construction.
SHARE_P_VALUE, BINARY_P_VALUE = "betting", "binomial"
# Losses this far outside [0, 1] are accepted as rounding noise and clipped.
LOSS_TOLERANCE = 1e-9


@dataclass
class LTTResult:
    """The outcome of `learn_then_test`; every list is in test order (strict -> loose)."""

    lambdas: list[float]
    risks: list[float]
    p_values: list[float]
    rejected: list[bool]
    chosen_index: int | None
    delta: float
    epsilon: float
    n: int
    method: str
    # Candidates after the first one not rejected, never evaluated (a lazy fixed-sequence test stops there).
    untested: int = 0

    @property
    def chosen(self) -> float | None:
        """The certified threshold (the loosest rejected candidate), or None."""
        return None if self.chosen_index is None else self.lambdas[self.chosen_index]

    def statement(self) -> str:
        """The guarantee (or the lack of one) in plain language."""
        confidence = f"{100 * (1 - self.epsilon):.4g}%"
        examples = f"{self.n} calibration example{'s' if self.n != 1 else ''}"
        if self.chosen_index is None:
            first = 0
            return (
                f"No candidate could be certified: even the strictest threshold "
                f"(lambda = {self.lambdas[first]:.6g}, empirical risk {self.risks[first]:.4g}, "
                f"p-value {self.p_values[first]:.3g}) is not shown to have risk <= {self.delta:.4g} "
                f"at epsilon = {self.epsilon:.4g} with {examples}; loosen delta or epsilon, "
                f"add calibration examples, or add stricter candidates."
            )
        j = self.chosen_index
        where = "never exiting" if math.isinf(self.lambdas[j]) else f"lambda = {self.lambdas[j]:.6g}"
        return (
            f"At {where} (empirical risk {self.risks[j]:.4g}): "
            f"with probability >= {confidence} (epsilon = {self.epsilon:.4g}), the risk is "
            f"<= {self.delta:.4g} on data exchangeable with the {examples}; this assumes "
            f"deployment data is like the calibration data."
        )

    def to_dict(self) -> dict:
        """A JSON-ready summary (plain Python types), including `chosen` and `statement`."""
        return {
            "lambdas": [None if math.isinf(x) else float(x) for x in self.lambdas],  # None: never exit
            "risks": [float(x) for x in self.risks],
            "p_values": [float(x) for x in self.p_values],
            "rejected": [bool(x) for x in self.rejected],
            "chosen_index": self.chosen_index,
            "chosen": None if self.chosen is None or math.isinf(self.chosen) else float(self.chosen),
            "delta": float(self.delta),
            "epsilon": float(self.epsilon),
            "n": int(self.n),
            "method": self.method,
            "untested": self.untested,
            "statement": self.statement(),
        }


def _check_unit_interval(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DyninferError(f"{name} must be a number strictly between 0 and 1, got {value!r}.") from None
    if not 0.0 < value < 1.0:
        raise DyninferError(f"{name} must be strictly between 0 and 1, got {value!r}; pick e.g. 0.05.")
    return value


def _check_p_value_args(risk_hat: float, n: int, delta: float) -> tuple[float, int, float]:
    delta = _check_unit_interval("delta", delta)
    if isinstance(n, bool) or not float(n).is_integer() or n < 1:
        raise DyninferError(f"n (the number of calibration examples) must be an integer >= 1, got {n!r}.")
    risk_hat = float(risk_hat)
    if not -LOSS_TOLERANCE <= risk_hat <= 1.0 + LOSS_TOLERANCE:
        raise DyninferError(f"risk_hat must be an empirical mean of losses in [0, 1], got {risk_hat!r}; rescale the losses.")
    return min(max(risk_hat, 0.0), 1.0), int(n), delta


def _h1(a: float, b: float) -> float:
    """Binary KL divergence kl(a || b) with 0 log 0 = 0 (b strictly inside (0, 1))."""
    out = 0.0
    if a > 0.0:
        out += a * math.log(a / b)
    if a < 1.0:
        out += (1.0 - a) * math.log((1.0 - a) / (1.0 - b))
    return out


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) <= k), from the regularized incomplete beta function (scipy.special: a fraction of
    scipy.stats' import time)."""
    return float(special.bdtr(k, n, p))


def binomial_p_value(risk_hat: float, n: int, delta: float) -> float:
    """Exact p-value for ``H0: R > delta`` from n BINARY (0/1) losses with mean ``risk_hat``.

    ``P(Binom(n, delta) <= k)`` with ``k = round(n * risk_hat)`` the number of losses.
    Valid only when every loss is exactly 0 or 1; use `hoeffding_bentkus_p_value` otherwise.
    """
    risk_hat, n, delta = _check_p_value_args(risk_hat, n, delta)
    k = math.floor(n * risk_hat + 0.5)
    return float(min(_binomial_cdf(k, n, delta), 1.0))


def hoeffding_bentkus_p_value(risk_hat: float, n: int, delta: float) -> float:
    """Hoeffding-Bentkus p-value for ``H0: R > delta`` from n losses in [0, 1].

    Bates et al. 2021, "Distribution-free, risk-controlling prediction sets":
    ``p_H = exp(-n * h1(min(risk_hat, delta), delta))`` with ``h1`` the binary KL
    divergence, ``p_B = e * P(Binom(n, delta) <= ceil(n * risk_hat))``, and the p-value
    is ``min(p_H, p_B, 1)``. ``n * risk_hat`` within 1e-9 of an integer counts as that
    integer, so floating-point noise in a mean does not bump the ceiling.
    """
    risk_hat, n, delta = _check_p_value_args(risk_hat, n, delta)
    p_h = math.exp(-n * _h1(min(risk_hat, delta), delta))
    total = n * risk_hat
    k = round(total) if abs(total - round(total)) <= 1e-9 * max(1.0, total) else math.ceil(total)
    p_b = math.e * float(_binomial_cdf(k, n, delta))
    return float(min(p_h, p_b, 1.0))


def betting_p_value(losses, delta: float, epsilon: float = 0.05) -> float:
    """Waudby-Smith-Ramdas betting p-value for ``H0: R >= delta`` from losses in [0, 1], in their order (the order the
    exchangeable units were drawn in).

    A gambler bets against H0 at each unit with a stake fixed before seeing it, multiplying their capital by
    ``1 + nu_i (delta - L_i)``; under H0 the capital is a nonnegative supermartingale, so by Ville's inequality
    it reaches ``1/epsilon`` with probability at most epsilon, and ``1 / max_t K_t`` is a valid p-value. Stakes
    follow the predictable plug-in of Waudby-Smith & Ramdas (2024, "Estimating means of bounded random variables
    by betting"), as Bates et al. use it for risk control: ``nu_i = min(1, sqrt(2 log(1/epsilon) / (n sigma_{i-1}^2)))``
    with a running variance that starts at 1/4. Small losses with little spread certify with far fewer units
    than Hoeffding-Bentkus (which reads only the mean); all-zero losses need a few more (63 against 59 at
    delta 0.05, epsilon 0.05).
    """
    capital = betting_capital(losses, delta, epsilon)
    return float(min(1.0, 1.0 / max(float(capital.max()), 1e-300)))


def betting_capital(losses, delta: float, epsilon: float, n: int | None = None) -> np.ndarray:
    """The gambler's capital after each of `losses` (in order), stakes sized for `n` units in all (default: these)."""
    delta = _check_unit_interval("delta", delta)
    epsilon = _check_unit_interval("epsilon", epsilon)
    values = np.clip(np.asarray(losses, dtype=float).ravel(), 0.0, 1.0)
    n = values.size if n is None else n
    if values.size == 0 or n < values.size:
        raise DyninferError("no losses to bet on; calibrate on at least one example.")
    seen = np.arange(1, values.size + 1)
    mean = (0.5 + np.cumsum(values)) / (seen + 1)
    variance = (0.25 + np.cumsum((values - mean) ** 2)) / (seen + 1)
    before = np.concatenate([[0.25], variance[:-1]])  # each stake reads only the units before it
    stakes = np.minimum(1.0, np.sqrt(2.0 * math.log(1.0 / epsilon) / (n * before)))
    return np.cumprod(1.0 + stakes * (delta - values))


def betting_decided(losses, delta: float, epsilon: float, n: int) -> bool | None:
    """Whether the first len(`losses`) of `n` units already decide `betting_p_value` <= epsilon over all n, whatever the
    rest: True when the capital has reached 1/epsilon (the p-value reads its maximum), False when it cannot any more
    (each unit multiplies it by at most 1 + delta: stakes are at most 1 and losses at least 0), None while open. The
    stakes read only earlier units, so stopping at a decision is the same test as computing every unit."""
    capital = betting_capital(losses, delta, epsilon, n)
    if capital.max() >= 1.0 / epsilon:
        return True
    if capital[-1] * (1.0 + delta) ** (n - capital.size) < 1.0 / epsilon:
        return False
    return None


def betting_prefix_p_value(losses, delta: float, epsilon: float, n: int) -> float:
    """1 / the largest capital over the first units of `n` (stakes sized for n): once `betting_decided` says True or False,
    on the same side of epsilon as the p-value over all n."""
    return float(min(1.0, 1.0 / max(float(betting_capital(losses, delta, epsilon, n).max()), 1e-300)))


def p_values_of(losses: np.ndarray, delta: float, epsilon: float, method: str) -> tuple[list[float], str]:
    """Each candidate's p-value (rows of `losses` [candidates, n]) under `method` ("auto" resolved), and the method."""
    binary = bool(np.all((losses == 0.0) | (losses == 1.0)))
    if method == "auto":
        method = "binomial" if binary else "betting"
    elif method == "binomial" and not binary:
        raise DyninferError(
            "method 'binomial' needs losses that are exactly 0 or 1; use 'betting', 'hoeffding-bentkus' or 'auto' for losses in [0, 1]."
        )
    n = int(losses.shape[1])
    if method == "betting":
        return [betting_p_value(row, delta, epsilon) for row in losses], method
    p_value = binomial_p_value if method == "binomial" else hoeffding_bentkus_p_value
    return [p_value(float(row.mean()), n, delta) for row in losses], method


def _check_losses(losses, lambdas) -> tuple[np.ndarray, list[float]]:
    try:
        lambdas = [float(x) for x in lambdas]
    except (TypeError, ValueError):
        raise DyninferError("lambdas must be a sequence of numbers (candidate thresholds, strict -> loose).") from None
    if not lambdas:
        raise DyninferError("lambdas is empty; give at least one candidate threshold.")
    if any(math.isnan(x) for x in lambdas):
        raise DyninferError("lambdas contains NaN; give numeric candidate thresholds.")
    try:
        array = np.asarray(losses, dtype=float)
    except (TypeError, ValueError):
        raise DyninferError("losses must be a numeric array of shape [n_lambdas, n_examples].") from None
    if array.ndim != 2:
        raise DyninferError(
            f"losses must be 2-D [n_lambdas, n_examples] (one row per candidate, one column per "
            f"example), got shape {array.shape}; for one candidate use losses[None, :]."
        )
    if array.shape[0] != len(lambdas):
        raise DyninferError(
            f"losses has {array.shape[0]} rows but there are {len(lambdas)} lambdas; give one row of per-example losses per candidate."
        )
    if array.shape[1] < 1:
        raise DyninferError("losses has no examples (0 columns); calibrate on at least one example.")
    if not np.all(np.isfinite(array)):
        raise DyninferError("losses contains NaN or infinite values; every per-example loss must be in [0, 1].")
    low, high = float(array.min()), float(array.max())
    if low < -LOSS_TOLERANCE or high > 1.0 + LOSS_TOLERANCE:
        raise DyninferError(
            f"losses must lie in [0, 1], found values in [{low:.6g}, {high:.6g}]; "
            f"use a bounded per-example loss (e.g. the fraction of inconsistent tokens in a window)."
        )
    return np.clip(array, 0.0, 1.0), lambdas


def learn_then_test(losses, lambdas, delta: float, epsilon: float, method: str = "auto") -> LTTResult:
    """Certify the loosest threshold whose risk is <= ``delta`` with probability >= 1 - ``epsilon``.

    ``losses[j, i]`` is the loss of example ``i`` under candidate ``lambdas[j]``, in [0, 1];
    each column is one independent example (a sequence or window, not a token), so
    ``n = losses.shape[1]``. ``lambdas`` must already be in test order, from the strictest
    (safest) to the loosest; they are NOT sorted, because whether "strict" means a high
    or a low value depends on the threshold.

    ``method``: ``"binomial"`` (exact, 0/1 losses only), ``"hoeffding-bentkus"`` or ``"betting"`` (any losses in
    [0, 1]; betting reads the losses in their order, the order the units were drawn), or ``"auto"``: binomial
    when every loss is exactly 0 or 1, else betting.
    P-values are computed for every candidate (for reporting), but fixed-sequence testing
    rejects only the prefix with ``p <= epsilon``; a later candidate after a failure is
    never taken, even if its own p-value is small.
    """
    delta = _check_unit_interval("delta", delta)
    epsilon = _check_unit_interval("epsilon", epsilon)
    if method not in METHODS:
        raise DyninferError(f"Unknown LTT method {method!r}; use one of {', '.join(METHODS)}.")
    array, lambdas = _check_losses(losses, lambdas)
    n = int(array.shape[1])
    risks = [float(r) for r in array.mean(axis=1)]
    p_values, method = p_values_of(array, delta, epsilon, method)
    rejected = [False] * len(lambdas)
    for j, p in enumerate(p_values):
        if p > epsilon:
            break
        rejected[j] = True
    chosen_index = max((j for j, r in enumerate(rejected) if r), default=None)
    return LTTResult(
        lambdas=lambdas,
        risks=risks,
        p_values=p_values,
        rejected=rejected,
        chosen_index=chosen_index,
        delta=delta,
        epsilon=epsilon,
        n=n,
        method=method,
    )


def min_examples(delta: float, epsilon: float, method: str = "hoeffding-bentkus") -> int:
    """The fewest examples with which even a zero empirical risk is certified by `method` ("auto" and "binomial":
    the binomial test of zero losses, whose minimum Hoeffding-Bentkus shares)."""
    delta, epsilon = _check_unit_interval("delta", delta), _check_unit_interval("epsilon", epsilon)
    n = max(1, math.ceil(math.log(epsilon) / math.log(1.0 - delta)) - 1)
    if method == "betting":
        while betting_p_value(np.zeros(n), delta, epsilon) > epsilon:
            n += 1
        return n
    while hoeffding_bentkus_p_value(0.0, n, delta) > epsilon:
        n += 1
    return n


def examples_needed(risk: float, delta: float, epsilon: float, method: str, spread: float = 0.0, seed: int = 0) -> int:
    """The fewest examples whose p-value certifies `delta` at `epsilon` when their losses have mean `risk`: constant
    losses (`spread` 0), or (`spread` > 0) losses drawn from a Beta distribution of that mean and standard
    deviation, in a fixed random order (the median over a few draws). For planning and reporting, not a guarantee."""
    rng = np.random.default_rng(seed)

    def certifies(n: int) -> bool:
        if spread <= 0:
            samples = [np.full(n, risk)]
        else:
            concentration = max(risk * (1 - risk) / spread**2 - 1, 1e-3)
            samples = [rng.beta(risk * concentration, (1 - risk) * concentration, n) for _ in range(9)]
        p = [p_values_of(sample[None, :], delta, epsilon, method)[0][0] for sample in samples]
        return float(np.median(p)) <= epsilon

    low, high = 1, 2
    while not certifies(high):
        low, high = high, high * 2
        if high > 10**7:
            raise DyninferError(f"a mean loss of {risk:g} is not certifiable at delta {delta:g}: lower it below delta")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if certifies(middle) else (middle, high)
    return high


def fixed_sequence_test(lambdas, losses_of, delta: float, epsilon: float, method: str = "auto") -> tuple[LTTResult, np.ndarray]:
    """Learn-then-Test where each candidate's losses are computed only when the test reaches it.

    ``losses_of(j)`` returns the per-example losses (in [0, 1], one per independent example) of
    ``lambdas[j]``; candidates are visited strict -> loose and the test stops at the first one
    whose p-value (`method`, as `learn_then_test`) exceeds ``epsilon``, so the loosest candidates cost nothing
    when they cannot be certified. Returns the result over the candidates evaluated (the rest
    counted in ``untested``) and their losses [evaluated, n].
    """
    delta = _check_unit_interval("delta", delta)
    epsilon = _check_unit_interval("epsilon", epsilon)
    lambdas = [float(x) for x in lambdas]
    if not lambdas:
        raise DyninferError("lambdas is empty; give at least one candidate threshold.")
    rows: list[np.ndarray] = []
    for j in range(len(lambdas)):
        row, _ = _check_losses(np.asarray(losses_of(j), dtype=float)[None, :], lambdas[j : j + 1])
        rows.append(row[0])
        if p_values_of(row, delta, epsilon, method)[0][0] > epsilon:
            break
    losses = np.stack(rows)
    result = learn_then_test(losses, lambdas[: len(rows)], delta, epsilon, method=method)
    result.untested = len(lambdas) - len(rows)
    return result, losses


def naive_choice(losses, lambdas, delta: float) -> int | None:
    """The baseline WITHOUT a guarantee: the loosest candidate with empirical risk <= delta.

    Scans every candidate (not only a prefix) and returns the last index whose mean loss
    is <= ``delta``, or None. It overfits the calibration set: its true risk exceeds
    ``delta`` far more often than ``epsilon``. For comparison only.
    """
    delta = _check_unit_interval("delta", delta)
    array, _ = _check_losses(losses, lambdas)
    passing = np.flatnonzero(array.mean(axis=1) <= delta)
    return int(passing[-1]) if passing.size else None
