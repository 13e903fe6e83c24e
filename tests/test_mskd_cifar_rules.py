"""The MobileNetV2 study's decision rules (benchmarks/mskd_cifar_rules.py) judge rows as BENCHMARKS.md writes them."""

from benchmarks import mskd_cifar_rules

CE = {0: 0.8349, 1: 0.8394, 2: 0.8370}  # seed noise 0.23 points


def _lines(**tests):
    return mskd_cifar_rules.verdicts({"l1 + CE": CE, **tests}, teacher_test=0.885, int8={})


def test_differences_are_paired_by_seed_over_the_seeds_both_rows_have():
    difference = mskd_cifar_rules.paired({0: 0.80, 1: 0.82, 2: 0.90}, {0: 0.79, 1: 0.80})
    assert (round(difference.mean, 6), difference.n, round(difference.se, 6)) == (1.5, 2, 0.5)
    assert mskd_cifar_rules.paired({0: 0.8}, {1: 0.8}) is None


def test_a_bar_is_met_missed_or_waits_for_its_three_seeds():
    kd = {0: 0.8593, 1: 0.8600, 2: 0.8610}
    met = _lines(default={0: 0.8759, 1: 0.8700, 2: 0.8690}, **{"l1 + KD": kd})
    assert "default - `l1`-uniform + KD >= +0.50: +1.15 (n=3, s.e. 0.26): **met**" in met[1]
    missed = _lines(default={0: 0.8600, 1: 0.8640, 2: 0.8650}, **{"l1 + KD": kd})
    assert "**missed**" in missed[1] and "no difference" not in missed[1]  # +0.29 is above the 0.23 noise
    waiting = _lines(default={0: 0.8759, 1: 0.8700}, **{"l1 + KD": kd})
    assert "waiting for rows (2 of 3 paired; so far +1.33" in waiting[1]


def test_a_difference_under_the_seed_noise_is_reported_as_none():
    default = {0: 0.8759, 1: 0.8700, 2: 0.8690}
    lines = _lines(default=default, **{"MS-KD": {0: 0.8769, 1: 0.8700, 2: 0.8690}})
    assert lines[0].endswith("0.23 points")
    assert "+0.03 (n=3" in lines[-1] and "**missed; under the seed noise (0.23): no difference (R4)**" in lines[-1]


def test_the_int8_bar_is_the_worst_exported_student():
    lines = mskd_cifar_rules.verdicts({}, teacher_test=0.885, int8={1: (0.870, 0.868), 2: (0.870, 0.866)})
    assert "seed 1 -0.20, seed 2 -0.40: **missed**" in [line for line in lines if "int8" in line][0]
