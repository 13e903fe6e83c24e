"""The CIFAR-10 study's rows as data (benchmarks/mskd_cifar.py runs them): what a row is, the plan that orders
them, the names they are cached under in the results file, and the candidates some kinds of row pick."""
from __future__ import annotations

import dataclasses
import json
import math
import re

from absl import flags

FLAGS = flags.FLAGS  # defined by mskd_cifar.py, read when a plan is made


BASELINE = "l1-uniform"  # what most users do: L1 filter norms, the same ratio in every layer


POOL_SETTINGS = ("min_params_ratio", "capacity_reference")  # settings of a selection's capacity pool


# The allocations of the MobileNetV2 protocol's R2 rows: the library's default ones plus the opt-in sensitivity one
# (Config.allocations); their candidates are built in a work dir of their own.
WITH_SENSITIVITY = "global+uniform+sensitivity"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table (one training), cached in the results file under ``row_key(row, s)``.

    kind: "student" (``candidate`` fine-tuned for the budget under ``loss``), "mskd" (the library's selection, then
    KD on its pick for what the selection left of the budget), "select+ce" (the same selection, then CE: the KD
    ablation), "zc+kd" (the capacity pool's zero-cost top at the row's target + KD for the whole budget), or
    "select" (the selection a mskd or select+ce row starts from, cached as a row of its own).
    candidate: None where the kind picks it. loss: "kd" or "ce". target: the fraction of the teacher's MACs.
    settings: the row's overrides of the table's settings, sorted by name: the KD loss's (alpha, temperature,
    feature_kd), the peak learning rate (lr; for the kinds with a selection the rate of its KD runs), the
    capacity pool (min_params_ratio, and capacity_reference where it is not the table's) and the allocations its
    candidates were built with ("+"-joined, where not the library's default ones: another candidate set).
    """

    kind: str
    candidate: str | None
    loss: str
    seed: int
    target: float
    settings: tuple = ()


def kd_overrides(s: dict, **values) -> tuple:
    """The settings of a row trained or selected under the KD loss. The table's own KD rate and capacity pool are
    not overrides: a row given them is the default row, whose name never said them."""
    defaults = {"lr": s["kd_lr"], "min_params_ratio": s["min_params_ratio"]}
    return tuple(sorted((name, value) for name, value in values.items()
                        if name not in defaults or not math.isclose(value, defaults[name], rel_tol=0, abs_tol=1e-12)))


def experiment_plan(s: dict, candidates: dict, oracle: str | None) -> list[Row]:
    """The whole experiment: every row of the table, in the order they are computed.

    A sitting ends after any row and a rerun resumes at the first one not cached, so the order puts first what a
    partial table should already answer. candidates: the decisive target's (criterion -> its record, with the
    zero-cost score val_acc_before_finetune); oracle: the best candidate + CE at seed 0 once all of those rows are
    cached (until then None, and its rows at more seeds wait). A row listed twice is computed where it comes first.
    Two plans: the ResNet-20 study's and, for --model=mobilenet_v2, the MobileNetV2 study's protocol.
    """
    decisive_target, seeds = s["target_macs"], s["seeds"]
    s0, more_seeds = seeds[0], seeds[1:]
    mobilenet = follows_mobilenet_protocol(s)

    def ce(candidate, seed, target=decisive_target, lr=None):
        return Row("student", candidate, "ce", seed, target, () if lr is None else (("lr", lr),))

    def kd(candidate, seed, target=decisive_target, **kd_settings):
        return Row("student", candidate, "kd", seed, target, kd_overrides(s, **kd_settings))

    def mskd(seed, target=decisive_target, **kd_settings):  # selection and distillation both under kd_settings
        return Row("mskd", None, "kd", seed, target, kd_overrides(s, **kd_settings))

    def select_ce(seed, **kd_settings):  # the selection under kd_settings, then CE
        return Row("select+ce", None, "ce", seed, decisive_target, kd_overrides(s, **kd_settings))

    def zc_kd(seed, target=decisive_target, allocations=None):  # allocations: another candidate set's (see Row)
        return Row("zc+kd", None, "kd", seed, target, () if allocations is None else (("allocations", allocations),))

    def decisive(seed):  # at seed 0 also selection + CE, which splits MS-KD's gain
        return [ce(BASELINE, seed), mskd(seed), *([select_ce(seed)] if seed == s0 else []), kd(BASELINE, seed)]

    zc_kd_seeds = [int(x) for x in FLAGS.zc_kd_seeds]

    def other_target(target, method):  # l1 + CE at seed 0; l1 + KD and method also at the --other_target_seeds; zc+kd
        return [ce(BASELINE, s0, target),
                *[row for seed in [s0, *map(int, FLAGS.other_target_seeds)]
                  for row in (kd(BASELINE, seed, target), method(seed, target))],
                *[zc_kd(seed, target) for seed in zc_kd_seeds]]

    def ablation_flag(name):  # the MobileNetV2 protocol has none unless their flags are given
        return FLAGS[name].value if FLAGS[name].present or not mobilenet else []

    # The ablations, most useful first: the KD loss is the one lever left on bar 1 (the oracle best + CE is level
    # with l1 + CE, so selection cannot add there; KD adds +0.5-0.7); then the baseline's lr; then the pool.
    ablations = [
        *[kd(BASELINE, s0, **setting)  # which settings help l1 + KD
          for setting in _settings_flag(ablation_flag("kd_ablation"))],
        *[row for setting in _settings_flag(FLAGS.mskd_kd_ablation) for seed in seeds  # a winning one, at every seed
          for row in (kd(BASELINE, seed, **setting), mskd(seed, **setting))],
        *[ce(BASELINE, s0, lr=float(lr))  # is the baseline's learning rate a fair one?
          for lr in ablation_flag("lr_ablation")],
        *[row for ratio in map(float, ablation_flag("pool_ablation"))  # what the capacity pool gave
          for row in (mskd(s0, min_params_ratio=ratio), select_ce(s0, min_params_ratio=ratio))],
    ]
    if mobilenet:  # docs/benchmarks/mskd_cifar_mobilenet_v2.md: its rows (1)-(4) and R2's, in its order

        def compared(seed):  # the rows the decision rules compare, paired by seed
            return [ce(BASELINE, seed), kd(BASELINE, seed), zc_kd(seed), mskd(seed)]

        plan = [
            *first_rows(s, candidates),
            # (1) seed 0: l1 + CE, l1 + KD, the library's default (what `python -m mskd_tf.run` does with no
            # selection flags: the capacity pool's zero-cost pick + KD for all of B), MS-KD with fine-tuned selection
            # (the table's --select_epochs, 1.5, inside B).
            *compared(s0),
            *(ablations if FLAGS.ablations_first else []),
            *[row for seed in more_seeds for row in compared(seed)],  # (2) the same at seeds 1 and 2
            # R2 (does the opt-in sensitivity allocation join the default ones?): the default again, on candidates
            # built with it too (a work dir of their own), paired by seed with the default rows above.
            *[zc_kd(seed, allocations=WITH_SENSITIVITY) for seed in seeds],
            # (3) the oracle: every distinct candidate + CE, best zero-cost score first (or the protocol's subset).
            *[ce(c, s0) for c in oracle_candidates(s, candidates)],
            # (4) l1 + CE, l1 + KD and the default at the other MACs targets.
            *[row for target in s["other_targets"] for row in other_target(target, zc_kd)],
            *([] if FLAGS.ablations_first else ablations),
        ]
        return list(dict.fromkeys(plan))
    plan = [
        *first_rows(s, candidates),
        *decisive(s0),
        *(ablations if FLAGS.ablations_first else []),
        # The seed noise of one row, before the rest of the oracle: the candidates end within ~1.3 points of each
        # other and l2-uniform (l1-uniform's widths; uniform widths no longer depend on the ranking) ended 1.08
        # below it; whether any selection can beat the default criterion depends on that spread exceeding the
        # noise. l2-uniform's seed 1 separates kept channels from noise.
        *[ce(BASELINE, seed) for seed in more_seeds],
        *([ce("l2-uniform", more_seeds[0])] if more_seeds and "l2-uniform" in candidates else []),
        # The decisive rows' other seeds before the rest of the oracle: the bars are on 3-seed means, and the
        # remaining oracle rows then test the capacity pool on candidates it was not derived from.
        *[row for seed in more_seeds for row in decisive(seed)],
        # What the selection's training buys: the capacity pool's zero-cost top + KD for the whole budget (no
        # halving steps). At seed 0 that is MS-KD's own pick, so the row isolates the 528 selection steps.
        *[zc_kd(seed) for seed in [s0, *zc_kd_seeds]],
        # The oracle table, in the order a selection meets the candidates (best zero-cost score first), so a
        # partial table already scores the picks of the selection rules (benchmarks/selection_signals.py).
        *[ce(c, s0) for c in oracle_candidates(s, candidates)],
        # The other MACs targets (does KD's gain grow with the teacher-student gap?).
        *[row for target in s["other_targets"] for row in other_target(target, mskd)],
        *[ce(oracle, seed) for seed in (more_seeds if oracle else [])],
        # R2's ResNet-20 half: does the default lose more than 0.1 when the sensitivity allocation joins its candidates?
        *([zc_kd(seed, allocations=WITH_SENSITIVITY) for seed in seeds] if FLAGS.sensitivity_rows else []),
        *([] if FLAGS.ablations_first else ablations),
    ]
    return list(dict.fromkeys(plan))


def _settings_flag(entries: list) -> list[dict]:
    """--kd_ablation's key=value entries as {key: value}."""
    return [{key: float(value)} for key, value in (entry.split("=") for entry in entries)]


def first_rows(s: dict, candidates: dict) -> list[Row]:
    """The --first rows: single-candidate rows a finished row raised a question about, before the order."""
    rows = []
    for name in FLAGS.first:
        match = re.fullmatch(r"(ce|kd):([\w-]+)(?:\[lr=(\d+(?:\.\d+)?)\])?/s(\d+)", name)
        if not match or match[2] not in candidates or (match[3] and match[1] == "ce"):
            raise SystemExit(f"--first={name!r}: expected ce:<candidate>/s<seed> or kd:<candidate>[lr=<rate>]/s<seed> "
                             f"with a candidate of this table ({', '.join(sorted(candidates))}).")
        rows.append(Row("student", match[2], match[1], int(match[4]), s["target_macs"],
                        kd_overrides(s, lr=float(match[3])) if match[3] else ()))
    return rows


def follows_mobilenet_protocol(s: dict) -> bool:
    """Whether the table follows the MobileNetV2 study's protocol
    (docs/benchmarks/mskd_cifar_mobilenet_v2.md, written before any row): derived from --model, so the driver command
    committed there computes it as written; every other table follows the ResNet-20 study's plan."""
    return s["model"] == "mobilenet_v2"


ORACLE_MAX_NETWORKS = 12  # the MobileNetV2 protocol's oracle trains every distinct candidate up to this many


def by_zero_cost(names, candidates: dict) -> list[str]:
    """The names, best zero-cost score first (ties in the order given)."""
    return sorted(names, key=lambda c: -candidates[c]["val_acc_before_finetune"])


def oracle_candidates(s: dict, candidates: dict) -> list[str]:
    """The candidates of the oracle table (each + CE at seed 0), best zero-cost score first: every one (the ResNet-20 plan),
    or the MobileNetV2 protocol's choice (mobilenet_oracle)."""
    if follows_mobilenet_protocol(s):
        return mobilenet_oracle(candidates)[0]
    return by_zero_cost(candidates, candidates)


def mobilenet_oracle(candidates: dict) -> tuple[list[str], str]:
    """The MobileNetV2 protocol's oracle candidates, best zero-cost score first, and the rule that chose them: every
    distinct network (candidates keeping the same channels are one), or, if there are more than 12, the best two by
    zero-cost score of each allocation plus l1 of each allocation."""
    networks = {}  # kept channels -> the candidates keeping them (a results file's summary has none: each its own)
    for c, record in candidates.items():
        networks.setdefault(json.dumps(record.get("kept", c), sort_keys=True), []).append(c)
    # A network's name: l1's where l1 keeps it (its CE row is the baseline's, planned anyway), else the first name.
    named = {min(group, key=lambda c: (candidates[c]["ranking"] != "l1", c)): group for group in networks.values()}
    ranked = by_zero_cost(named, candidates)
    merged = "; ".join(" = ".join(group) for group in networks.values() if len(group) > 1)
    found = f"{len(named)} distinct networks among {len(candidates)} candidates" + (f" ({merged})" if merged else "")
    if len(named) <= ORACLE_MAX_NETWORKS:
        return ranked, f"every one of the {found}"
    chosen = set()
    for allocation in sorted({record["allocation"] for record in candidates.values()}):
        of_allocation = [n for n in ranked if any(candidates[c]["allocation"] == allocation for c in named[n])]
        chosen.update(of_allocation[:2])
        chosen.update(n for n in of_allocation if any(candidates[c]["ranking"] == "l1" for c in named[n]))
    return [n for n in ranked if n in chosen], (
        f"{found}, more than {ORACLE_MAX_NETWORKS}: the best two by zero-cost score of each allocation plus l1 of "
        f"each allocation, {len(chosen)} candidates")


def oracle_criterion(res, candidates: dict, s: dict) -> str | None:
    """The oracle candidate with the best validation accuracy after B steps of CE at seed 0, once every oracle
    candidate has that row cached (else None, e.g. while --later leaves oracle rows out)."""
    trained = set(oracle_candidates(s, candidates))
    # In the candidates' own order, so that a tie goes to the same candidate whatever the plan's order.
    found = {c: res.row(Row("student", c, "ce", s["seeds"][0], s["target_macs"])) for c in candidates if c in trained}
    if not found or None in found.values():
        return None
    return max(found, key=lambda c: found[c]["val_acc"])


def row_key(row: Row, s: dict) -> str:
    """The row's name in the results file, its cache key: ce:l1-uniform/s0, ce:l1-uniform@lr0.02/s0,
    kd:l1-uniform[alpha=0.1]/s0, mskd[min_params_ratio=0]/s1, select/s0, select+ce/s0, zc+kd/s2@30, ..."""
    if row.kind != "student":
        return f"{row.kind}{bracketed(row.settings)}/{seed_and_target(row, s)}"
    if row.loss == "ce":  # a CE row's one setting, its learning rate, named so before KD rows had settings
        lr = dict(row.settings).get("lr")
        return f"ce:{row.candidate}" + ("" if lr is None else f"@lr{lr:g}") + f"/{seed_and_target(row, s)}"
    return f"kd:{row.candidate}{bracketed(row.settings)}/{seed_and_target(row, s)}"


def seed_and_target(row: Row, s: dict) -> str:
    """s0, s1@30: the row's seed, and its MACs target unless that is the decisive one."""
    return f"s{row.seed}" + ("" if row.target == s["target_macs"] else target_tag(row.target))


def target_tag(target: float) -> str:
    return f"@{round(100 * target)}"


def candidate_set(row: Row) -> tuple:
    """What the row's candidates were built for: its MACs target and its allocations (None: the library's default)."""
    return row.target, dict(row.settings).get("allocations")


def candidate_set_tag(target: float, allocations: str | None) -> str:
    """A candidate set's name among the results file's digests: @30, @50[allocations=global+uniform+sensitivity]."""
    return target_tag(target) + ("" if allocations is None else f"[allocations={allocations}]")


def setting_tags(settings: tuple) -> list[str]:
    """Overrides as names write them: the capacity pool first, then the others by name."""
    values = dict(settings)
    pool = []
    if "min_params_ratio" in values:
        reference = values.pop("capacity_reference", None)
        pool = [f"min_params_ratio={values.pop('min_params_ratio'):g}" + (f" x {reference}" if reference else "")]
    return pool + [f"{name}={value}" if isinstance(value, str) else f"{name}={value:g}"
                   for name, value in values.items()]


def bracketed(settings: tuple) -> str:
    return "".join(f"[{tag}]" for tag in setting_tags(settings))


def network_name(s) -> str:
    """The teacher as the table names it: ResNet-20, MobileNetV2 0.5, ..."""
    model, width = s.get("model", "resnet20"), s.get("width", 1.0)
    if model.startswith("resnet"):
        return f"ResNet-{model[6:]}" + (f" {width:g}" if width != 1.0 else "")
    return {"mobilenet_v2": "MobileNetV2"}.get(model, model) + (f" {width:g}" if width != 1.0 else "")


def row_of(record: dict) -> Row:
    """The Row a cached record is the result of."""
    return Row(**{**record["row"], "settings": tuple(map(tuple, record["row"]["settings"]))})


def described(rows: dict, s: dict) -> dict:
    """The results file's rows (name -> record), each record with its Row. A record cached before records carried
    their Row gets it from its name: a one-time migration, saved with the table's next row (--render_only describes
    a file that gets no more rows anew each time)."""
    return {name: record if "row" in record else {**record, "row": dataclasses.asdict(_row_from_name(name, s))}
            for name, record in rows.items()}


def table_of(data: dict) -> dict:
    """A results file's rows as Row -> record, in the order they were cached."""
    return {row_of(record): record for record in described(data["rows"], data["settings"]).values()}


_ROW_NAME = re.compile(r"(?:(?P<kind>select\+ce|select|mskd|zc\+kd)|(?P<loss>ce|kd):(?P<candidate>[\w-]+)"
                       r"(?:@lr(?P<ce_lr>[\d.e+-]+))?)(?P<tags>(?:\[[^\]]+\])*)/s(?P<seed>\d+)(?:@(?P<target>\d+))?")


def _row_from_name(name: str, s: dict) -> Row:
    """The Row of a record cached before records carried their Row, from its name (written by row_key's rules)."""
    match = _ROW_NAME.fullmatch(name)
    if not match:
        raise ValueError(f"cached row {name!r} is named by none of row_key's rules")
    settings = {"lr": float(match["ce_lr"])} if match["ce_lr"] else {}
    for tag in re.findall(r"\[([^\]]+)\]", match["tags"]):  # [alpha=0.1], [min_params_ratio=0.9 x largest]
        setting, value = tag.split("=")
        value, _, reference = value.partition(" x ")
        settings.update({setting: float(value), **({"capacity_reference": reference} if reference else {})})
    kind = match["kind"] or "student"
    return Row(kind, match["candidate"], match["loss"] or ("ce" if kind == "select+ce" else "kd"), int(match["seed"]),
               int(match["target"]) / 100 if match["target"] else s["target_macs"], tuple(sorted(settings.items())))


def zero_cost_pick(candidates: dict, s: dict) -> str:
    """zc+kd's candidate: the best zero-cost score in the capacity pool (where MS-KD's selection starts), a tie going
    to fewer MACs, then to the first name, as in the library's select stage at --select_epochs=0."""
    from mskd_tf import selection

    pooled = selection.capacity_pool({c: r["params"] for c, r in candidates.items()}, s["min_params_ratio"])
    return min(pooled, key=lambda c: (-candidates[c]["val_acc_before_finetune"], candidates[c]["macs"], c))


def zero_cost_twins(row: Row, s: dict, candidates_of) -> list[Row]:
    """The rows that are this zc+kd row's very run, so that a cached one is copied, not trained again: its pick's KD
    row; on another candidate set (other allocations), the KD rows of the table's candidates keeping the pick's
    channels (the same network: same teacher, rankings and builder), and the table's zc+kd row if its pick is one
    of them. candidates_of(target, allocations): a candidate set's candidates ({} before they exist: no twins)."""
    target, allocations = candidate_set(row)
    candidates = candidates_of(target, allocations)
    if not candidates:
        return []
    pick = zero_cost_pick(candidates, s)
    if allocations is None:
        return [Row("student", pick, "kd", row.seed, target)]
    table_candidates = candidates_of(target, None)  # a results file's summary of them has no kept channels: none same
    same = [c for c, record in table_candidates.items() if record.get("kept", False) == candidates[pick]["kept"]]
    return [*(Row("student", c, "kd", row.seed, target) for c in same),
            *([Row("zc+kd", None, "kd", row.seed, target)] if same and zero_cost_pick(table_candidates, s) in same
              else [])]


def standard_rows(target: float) -> dict:
    """The rows every MACs target has, at seed 0, by their short label."""
    return {"l1 + CE": Row("student", BASELINE, "ce", 0, target), "l1 + KD": Row("student", BASELINE, "kd", 0, target),
            "MS-KD": Row("mskd", None, "kd", 0, target), "zc+kd": Row("zc+kd", None, "kd", 0, target)}
