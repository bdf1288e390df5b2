"""The statistics a study reports, as pure functions: means with Student-t intervals over seeds,
paired differences, and McNemar's exact test on per-question outcomes."""

from __future__ import annotations

import math

from scipy import stats


def mean_interval(values: list[float], level: float = 0.95) -> dict:
  """Mean over seeds with its two-sided Student-t interval (half-width 0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return {"mean": mean, "low": mean, "high": mean, "n": n, "sd": 0.0}
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
  return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> dict:
  """b − a, paired by seed: the mean difference with its Student-t interval."""
  if len(a) != len(b):
    raise ValueError(f"paired samples differ in size: {len(a)} and {len(b)}")
  return mean_interval([y - x for x, y in zip(a, b)], level)


def mcnemar_exact(a_right: list[bool], b_right: list[bool]) -> dict:
  """McNemar's exact test on paired right/wrong outcomes: the two-sided binomial p-value of the
  discordant pairs (a right and b wrong vs a wrong and b right) under p = 1/2."""
  if len(a_right) != len(b_right):
    raise ValueError(f"paired outcomes differ in size: {len(a_right)} and {len(b_right)}")
  only_a = sum(1 for x, y in zip(a_right, b_right) if x and not y)
  only_b = sum(1 for x, y in zip(a_right, b_right) if y and not x)
  discordant = only_a + only_b
  p = 1.0 if discordant == 0 else stats.binomtest(only_b, discordant, 0.5).pvalue
  return {
      "test": "McNemar exact (two-sided binomial on discordant pairs)",
      "pairs": len(a_right),
      "only_first_right": only_a,
      "only_second_right": only_b,
      "p_value": float(p),
  }
