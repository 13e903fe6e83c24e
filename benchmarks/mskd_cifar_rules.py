"""The MobileNetV2 study's decision rules R1-R4 (BENCHMARKS.md, "MS-KD on MobileNetV2 0.5 (CIFAR-10)", as
committed before any row), applied to its rows as written there: each one met, missed or waiting.

Rows come in as test accuracies (fractions) by seed; every difference is a mean of seed-paired differences, in
points. R4 is applied to every difference: one under the seed noise of `l1` + CE is reported as no difference.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Difference:
    mean: float  # points
    n: int
    se: float | None  # standard error of the mean, points (None for one pair)

    def __str__(self):
        return f"{self.mean:+.2f} (n={self.n}" + (f", s.e. {self.se:.2f})" if self.se is not None else ")")


def paired(a: dict[int, float], b: dict[int, float], seeds=SEEDS) -> Difference | None:
    """a - b over the seeds both have, in points; None when they share none."""
    diffs = [100 * (a[seed] - b[seed]) for seed in seeds if seed in a and seed in b]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return Difference(statistics.mean(diffs), len(diffs), se)


def seed_noise(ce_tests: dict[int, float]) -> float | None:
    """R4's noise: the standard deviation of `l1`-uniform + CE's test accuracy over seeds 0-2, in points."""
    if not all(seed in ce_tests for seed in SEEDS):
        return None
    return 100 * statistics.stdev(ce_tests[seed] for seed in SEEDS)


def _judge(label: str, difference: Difference | None, at_least: float, seeds_needed: int, noise: float | None) -> str:
    head = f"{label} >= {at_least:+.2f}"
    if difference is None or difference.n < seeds_needed:
        so_far = f"; so far {difference}" if difference is not None else ""
        return f"{head}: waiting for rows ({difference.n if difference else 0} of {seeds_needed} paired{so_far})"
    verdict = "met" if difference.mean >= at_least else "missed"
    if noise is not None and abs(difference.mean) < noise:
        verdict += f"; under the seed noise ({noise:.2f}): no difference (R4)"
    return f"{head}: {difference}: **{verdict}**"


def verdicts(tests: dict[str, dict[int, float]], *, teacher_test: float,
             int8: dict[int, tuple[float, float]]) -> list[str]:
    """One line per rule. ``tests``: test accuracy by seed of the rows "default", "l1 + KD", "l1 + CE", "MS-KD",
    "default + sensitivity" and "oracle best + CE" (any may be missing or partial); ``int8``: (float, int8) test
    accuracy by seed of the default rows that were exported."""
    rows = {label: tests.get(label, {}) for label in ("default", "l1 + KD", "l1 + CE", "MS-KD",
                                                       "default + sensitivity", "oracle best + CE")}
    noise = seed_noise(rows["l1 + CE"])
    default = rows["default"]
    teacher = {seed: teacher_test for seed in SEEDS}
    lines = ["R4, the seed noise (std of `l1`-uniform + CE test over seeds 0-2): "
             + (f"{noise:.2f} points" if noise is not None else
                f"waiting ({len(rows['l1 + CE'])} of 3 seeds)")]
    lines.append("R1 " + _judge("default - `l1`-uniform + KD", paired(default, rows["l1 + KD"]), 0.5, 3, noise))
    lines.append("R1 " + _judge("default - `l1`-uniform + CE", paired(default, rows["l1 + CE"]), 1.0, 3, noise))
    lines.append("R1 " + _judge("default - the oracle's best + CE (seed 0)",
                                paired(default, rows["oracle best + CE"], seeds=(0,)), 0.0, 1, noise))
    lines.append("R1 " + _judge("default - teacher", paired(default, teacher), -1.5, 3, None))
    drops = {seed: 100 * (quantized - float_) for seed, (float_, quantized) in sorted(int8.items())}
    if drops:
        worst = min(drops.values())
        lines.append("R1 int8 - float test of the default's students >= -0.30: "
                     + ", ".join(f"seed {seed} {drop:+.2f}" for seed, drop in drops.items())
                     + f": **{'met' if worst >= -0.3 else 'missed'}**")
    else:
        lines.append("R1 int8 - float test of the default's students >= -0.30: waiting (no exported default row)")
    lines.append("R2 (MobileNetV2 half; the ResNet-20 half is judged on the 120-epoch table) "
                 + _judge("default with the sensitivity allocation - default",
                          paired(rows["default + sensitivity"], default), 0.3, 3, noise))
    lines.append("R3 (MobileNetV2 half; the ResNet-20 half is judged on the 120-epoch table) "
                 + _judge("MS-KD with fine-tuned selection - default", paired(rows["MS-KD"], default), 0.3, 3, noise))
    return lines
