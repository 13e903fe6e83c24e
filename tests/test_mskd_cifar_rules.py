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
    r3 = next(line for line in lines if line.startswith("R3 (MobileNetV2 half)"))
    assert "+0.03 (n=3" in r3 and "**missed; under the seed noise (0.23): no difference (R4)**" in r3


def test_the_int8_bar_is_the_worst_exported_student():
    lines = mskd_cifar_rules.verdicts({}, teacher_test=0.885, int8={1: (0.870, 0.868), 2: (0.870, 0.866)})
    assert "seed 1 -0.20, seed 2 -0.40: **missed**" in [line for line in lines if "int8" in line][0]


def test_r2_and_r3_change_the_default_only_when_their_resnet20_half_is_met_too():
    default = {0: 0.8759, 1: 0.8700, 2: 0.8690}
    mskd = {seed: acc + 0.005 for seed, acc in default.items()}  # +0.50 on MobileNetV2: its half is met
    resnet = {"l1 + CE": {0: 0.8610, 1: 0.8640, 2: 0.8645}, "default": {0: 0.8710, 1: 0.8690, 2: 0.8718}}

    def r3(resnet_mskd):
        lines = _lines(default=default, **{"MS-KD": mskd}) if resnet_mskd is None else mskd_cifar_rules.verdicts(
            {"l1 + CE": CE, "default": default, "MS-KD": mskd}, teacher_test=0.885, int8={},
            resnet20={**resnet, "MS-KD": resnet_mskd})
        return [line for line in lines if line.startswith("R3")]

    assert "**met**" in r3(None)[0] and "waiting for rows (0 of 3" in r3(None)[1]
    assert r3(None)[2].endswith("**waiting for a half**")
    lost = r3({0: 0.8680, 1: 0.8660, 2: 0.8690})  # -0.29 on ResNet-20, beyond its 0.19 seed noise
    assert "-0.29 (n=3" in lost[1] and "**missed**" in lost[1] and lost[2].endswith("**missed: the default stays**")
    level = r3({0: 0.8705, 1: 0.8695, 2: 0.8712})  # -0.02: within the 0.1 the rule allows
    assert "**met" in level[1] and level[2].endswith("**met: the default changes**")


def test_the_int8_bar_waits_for_both_exported_seeds():
    line = [line for line in mskd_cifar_rules.verdicts({}, teacher_test=0.885, int8={1: (0.8751, 0.8750)})
            if "int8" in line][0]
    assert line.endswith("seed 1 -0.01: waiting for seeds 2")
