"""Targets in a device's units: TFLite Micro tensor arena and int8 flash size, beside MACs and parameters.

A deployer has a board with so many KB of SRAM and flash; a MACs ratio says neither. Each candidate's plan is
searched here: the largest MACs ratio (at most ``--target_macs``) whose plan meets every target, the tightest
winning. MACs and parameters are counted from the plan (:class:`~mskd_tf.pruning.plan.CostModel`); the arena
and the flash size are predicted from it and then measured on the built candidate: converted to int8 and run in
TFLite Micro, whose recording allocator reports the arena it used. A candidate whose measurement misses a
target is planned again under MACs caps searched with measurements, and one whose measurement leaves room is
planned wider the same way, so the figures in ``candidates.json`` are measured ones.

Prediction (:class:`Predictor`): the arena's planned part follows the peak of live int8 activations
(:mod:`mskd_tf.pruning.memory`, a lower bound TFLM's greedy planner may exceed by its fragmentation), its
persistent part the kept output channels, the flash size the parameters, the latency the MACs; each is fitted
through two measured models, the teacher and its uniform half-MACs cut.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mskd_tf.errors import MskdError

KB = 1024
# Calibration images for the int8 conversions that measure the arena and flash size (neither depends on them).
CALIBRATION_IMAGES = 32
# Plans searched per candidate: the MACs ratio is bisected this many times.
SEARCH_STEPS = 14
# Measured re-plans of one candidate after its predicted plan missed a target.
MAX_REPLANS = 5
# The re-plan search stops once its widest measured hit is within this fraction of the MACs of its nearest miss.
REPLAN_RESOLUTION = 0.02
# A plan measured at least this fraction under every target is searched wider, with this many measured plans at
# most: the predictions are lines through two measured models and may leave room a measurement shows.
WIDEN_ROOM = 0.03
MAX_WIDENINGS = 2


@dataclasses.dataclass(frozen=True)
class Targets:
    """What a student must meet; 0 = no such target. ``macs`` and ``params``: a fraction (<= 1) or a count."""

    macs: float = 0.5
    params: float = 0.0
    arena_kb: float = 0.0
    flash_kb: float = 0.0
    latency_ms: float = 0.0
    latency_threads: int = 1

    @classmethod
    def from_config(cls, cfg):
        return cls(macs=cfg.target_macs, params=cfg.target_params, arena_kb=cfg.target_arena_kb,
                   flash_kb=cfg.target_flash_kb, latency_ms=cfg.target_latency_ms, latency_threads=cfg.latency_threads)

    @property
    def beyond_macs(self) -> bool:
        """Whether a target other than the MACs ratio is set (the candidates' plans are then searched)."""
        return bool(self.params or self.on_device)

    @property
    def on_device(self) -> bool:
        """Whether a target needs the int8 model measured (the arena, the flash size or the latency)."""
        return bool(self.arena_kb or self.flash_kb or self.latency_ms)

    def limits(self, base_params: int) -> dict:
        """``{what: the largest allowed value}`` in parameters and bytes, for the targets that are set."""
        limits = {}
        if self.params:
            limits["params"] = self.params * base_params if self.params <= 1 else self.params
        if self.arena_kb:
            limits["arena_bytes"] = self.arena_kb * KB
        if self.flash_kb:
            limits["flash_bytes"] = self.flash_kb * KB
        if self.latency_ms:
            limits["latency_ms"] = self.latency_ms
        return limits


def measure(model, calibration_images, *, latency_threads: int = 1) -> dict:
    """The int8 model's measured ``flash_bytes`` (its .tflite size, converted without the signature the exported
    file carries: a hundred bytes less, so the export stage's check is the word on a flash target), TFLM arena
    (``arena_bytes`` and its planned ``arena_head`` / persistent ``arena_tail`` parts) and LiteRT ``latency_ms``
    (median of 50 single-image runs on ``latency_threads`` threads, on this machine, with ``litert_kernels``:
    XNNPACK, or the builtin kernels where XNNPACK refuses the model)."""
    from mskd_tf import quantize
    from mskd_tf.deploy import tflm

    tflite = quantize.convert(model, "int8", calibration_images=calibration_images, signature=False)
    usage = tflm.arena_usage(tflite)
    if usage is None:
        raise MskdError(f"model {model.name!r}: TFLite Micro could not run its int8 conversion in a 64 MB arena; "
                        "device targets need a model TFLM runs.")
    runner = quantize.LiteRTModel(tflite, threads=latency_threads)
    return {"flash_bytes": len(tflite), "arena_bytes": usage["total"], "arena_head": usage["head"],
            "arena_tail": usage["tail"], "latency_ms": runner.latency_ms(calibration_images),
            "litert_kernels": runner.kernels}


def _output_channels(graph, mask) -> int:
    """Kept output channels of every layer with weights (the convolutions and dense layers TFLM quantizes)."""
    total = 0
    for path, record in graph.records.items():
        if getattr(record.layer, "weights", None) and "out" in record.maps and record.handler.weight_axes(record.layer):
            total += int(np.count_nonzero(mask[graph.channels(path, "out")]))
    return total


class Predictor:
    """Predicted arena and flash bytes of a plan, from two measured int8 models: the teacher and one cut.

    Each measured part is a line through the two points: the arena's planned part against the predicted peak
    of live activations (TFLM's planner adds a few KB of fragmentation), its persistent part against the kept
    output channels (per-channel multipliers, shifts and quantization), the flash size against the parameters
    (int8 kernels, int32 biases, per-channel scales). ``points``: ``[(plan keep or None, params, macs, measured)]``;
    none: parameters only. Latency follows the MACs on a line through the two (LiteRT's kernels run some widths
    no faster than wider ones: the measurement of each candidate decides).
    """

    def __init__(self, graph, base_params: int, points=()):
        from mskd_tf.pruning.memory import activation_peak

        self.graph, self.base_params, self._peak = graph, base_params, activation_peak
        self.lines = None
        if points:
            features = [self._features(keep, params, macs) for keep, params, macs, _ in points]
            (a, b), (ma, mb) = features, [measured for *_, measured in points]
            self.lines = {part: _line(a[x], ma[part], b[x], mb[part])
                          for part, x in (("arena_head", "peak"), ("arena_tail", "channels"), ("flash_bytes", "params"),
                                          ("latency_ms", "macs"))}

    def _features(self, keep, params, macs) -> dict:
        mask = self.graph.keep_mask(keep)
        return {"peak": self._peak(self.graph, keep).bytes, "channels": _output_channels(self.graph, mask),
                "params": params, "macs": macs}

    def __call__(self, plan) -> dict:
        predicted = {"params": plan.params}
        if self.lines is not None:
            x = self._features(plan.keep, plan.params, plan.macs)
            parts = {part: slope * x[feature] + offset
                     for (part, (slope, offset)), feature in zip(self.lines.items(),
                                                                 ("peak", "channels", "params", "macs"))}
            predicted["arena_bytes"] = parts["arena_head"] + parts["arena_tail"]
            predicted["flash_bytes"] = parts["flash_bytes"]
            predicted["latency_ms"] = parts["latency_ms"]
        return predicted


def _line(x0, y0, x1, y1):
    """``(slope, offset)`` through two points; a flat line through the first when they share x."""
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    return slope, y0 - slope * x0


def plan_to_targets(graph, scores, targets: Targets, predict, *, mode: str, max_macs: float | None = None,
                    **plan_options):
    """The plan of the largest MACs ratio (at most ``targets.macs`` and ``max_macs``) whose predicted costs meet
    the targets.

    ``predict(plan) -> {"params", "arena_bytes", "flash_bytes", "latency_ms"}``; a re-plan after a measured miss
    passes a ``max_macs`` below the missed plan's. Raises :class:`MskdError` when even the narrowest plan misses.
    """
    from mskd_tf.pruning.plan import plan_keep

    limits = targets.limits(predict.base_params)

    def meets(plan):
        predicted = predict(plan)  # without lines it predicts the parameters only (a measured search's plans)
        return all(predicted[key] <= limit for key, limit in limits.items() if key in predicted)

    widest = plan_keep(graph, scores, target_macs=min(targets.macs, max_macs or 1.0), mode=mode, **plan_options)
    if meets(widest):
        return widest
    narrowest = plan_keep(graph, scores, keep_ratio=1e-9, mode="uniform", **plan_options)
    if not meets(narrowest):
        predicted = predict(narrowest)
        raise MskdError(unreachable_message(targets, limits, predicted))
    low, high = narrowest.macs_ratio, widest.macs_ratio  # low meets, high does not
    best = narrowest
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        try:
            plan = plan_keep(graph, scores, target_macs=middle, mode=mode, **plan_options)
        except MskdError:  # below what this allocation reaches: move up
            low = middle
            continue
        if meets(plan):
            low, best = middle, max(best, plan, key=lambda p: p.macs)
        else:
            high = middle
    return best


def unreachable_message(targets: Targets, limits: dict, smallest: dict, basis: str = "predicted") -> str:
    """Which target the narrowest plan still misses, with the smallest value reachable: ``basis`` says how it is
    known: "predicted", "measured" (the narrowest architecture's int8 model), or a "lower_bound"."""
    flags = {"params": "--target_params", "arena_bytes": "--target_arena_kb", "flash_bytes": "--target_flash_kb"}
    missed = [key for key, limit in limits.items() if key in smallest and smallest[key] > limit]
    parts = []
    for key in missed:
        if key == "params":
            parts.append(f"--target_params={targets.params:g}: the narrowest plan keeps {smallest[key]} parameters")
        elif key == "latency_ms":
            parts.append(f"--target_latency_ms={targets.latency_ms:g}: the narrowest plan runs in about "
                         f"{smallest[key]:.3g} ms here ({targets.latency_threads} LiteRT thread(s))")
        else:
            qualifier = {"predicted": "about ", "measured": "", "lower_bound": "more than "}[basis]
            source = " (its int8 model, measured)" if basis == "measured" else ""
            parts.append(f"{flags[key]}={getattr(targets, key.replace('_bytes', '_kb')):g}: the narrowest plan needs "
                         f"{qualifier}{smallest[key] / KB:.1f} KB{source}")
    return ("; ".join(parts) + " (every layer at --min_channels, rounded to --round_to). Raise the target, lower "
            "--min_channels / --round_to, or use smaller input images.")


def _shortfall(limits: dict, measured: dict) -> float:
    """The largest miss as a ratio below 1 (limit / measured of the worst target)."""
    return min(limit / measured[key] for key, limit in limits.items() if key in measured)


_NARROWEST_MEASURED = {}  # (architecture JSON, LiteRT threads) -> measured costs: they depend on nothing else


def check_reachable(graph, targets: Targets, **plan_options):
    """Refuse, before any training, targets that even the narrowest plan cannot meet. First by bounds that need
    no conversion (the input tensor and the narrowest plan's peak of live int8 activations for the arena, one byte
    per parameter for the flash size, the parameter count itself); then, for an arena, flash or latency target,
    by the narrowest architecture's int8 model measured as every candidate is (TFLM's arena and the file's size
    depend on the shapes, not on the weights; LiteRT's time neither): a second or two, where the bounds alone
    would pass an arena the planned-out persistent part and TFLM's fragmentation put out of reach."""
    from mskd_tf import flops
    from mskd_tf.pruning.memory import activation_peak
    from mskd_tf.pruning.plan import plan_keep

    base_params = int(flops.count(graph.model).params)
    limits = targets.limits(base_params)
    if not limits:
        return
    narrowest = plan_keep(graph, None, keep_ratio=1e-9, mode="uniform", **plan_options)
    inputs = sum(math.prod(int(d) for d in tuple(t.shape)[1:]) for t in graph.model.inputs)
    if "arena_bytes" in limits and inputs > limits["arena_bytes"]:
        raise MskdError(f"--target_arena_kb={targets.arena_kb:g}: the int8 input image alone takes {inputs / KB:.1f} KB "
                        "of the arena; raise the target or use smaller input images.")
    bounds = {"params": narrowest.params, "flash_bytes": narrowest.params,
              "arena_bytes": activation_peak(graph, narrowest.keep).bytes}
    if any(bounds[key] > limit for key, limit in limits.items() if key in bounds):
        raise MskdError(unreachable_message(targets, limits, bounds, basis="lower_bound"))
    if targets.on_device:
        from mskd_tf.pruning import prune

        shape = tuple(int(d) for d in graph.model.inputs[0].shape[1:])
        images = np.random.default_rng(0).uniform(0, 1, (8, *shape)).astype(np.float32)
        model = prune(graph.model, narrowest.keep, graph)
        key = (model.to_json(), targets.latency_threads)  # every --targets item, and each stage's preflight, asks
        if key not in _NARROWEST_MEASURED:
            _NARROWEST_MEASURED[key] = measure(model, images, latency_threads=targets.latency_threads)
        measured = dict(_NARROWEST_MEASURED[key], params=narrowest.params)
        if any(measured[key] > limit for key, limit in limits.items()):
            raise MskdError(unreachable_message(targets, limits, measured, basis="measured"))


class TargetPlanner:
    """Plans candidates to the parameter / arena / flash targets and verifies each on the int8 model it becomes.

    ``images``: calibration images for the int8 conversions (None without an arena or flash target);
    ``plan_options``: ``round_to``, ``min_channels``, ``protect`` as for every plan.
    """

    def __init__(self, teacher, graph, targets: Targets, images, plan_options: dict):
        from mskd_tf import flops
        from mskd_tf.pruning import plan_keep, prune

        self.targets, self.graph, self.images, self.plan_options = targets, graph, images, plan_options
        base_params = int(flops.count(teacher).params)
        self.limits = targets.limits(base_params)
        self.teacher_measured = None
        points = []
        if targets.on_device:  # the predictions' anchors: the teacher's int8 model in TFLM, and its uniform half
            self.teacher_measured = self._measure(teacher)
            half = plan_keep(graph, None, keep_ratio=0.5, mode="uniform", **plan_options)
            points = [(None, base_params, int(flops.count(teacher).macs), self.teacher_measured),
                      (half.keep, half.params, half.macs, self._measure(prune(teacher, half.keep, graph)))]
        self.predict = Predictor(graph, base_params, points)
        self._counted = Predictor(graph, base_params)  # parameters only: for the plans searched on measurements
        # (MACs ratio, measured costs) of the anchors, toward which a plan with room is first widened
        self._anchors = [(macs / points[0][2], measured) for _, _, macs, measured in points]
        self._measured = {}  # kept widths -> measured costs: candidates of one shape (the uniform ones) share them
        self._searches = {}  # (search key, missed shape) -> the kept plan's MACs cap and shape

    def _measure(self, model) -> dict:
        return measure(model, self.images, latency_threads=self.targets.latency_threads)

    def planner(self, mode: str, max_macs: float | None = None, predicted: bool = True):
        """``fn(scores) -> Plan`` for ``build_candidates``: the widest plan of this allocation (at most ``max_macs``
        of the teacher's MACs) that meets the targets as predicted; ``predicted=False`` (a plan searched wider on
        measurements): that meets the parameter target, whatever the predicted arena, flash and latency."""
        predict = self.predict if predicted else self._counted
        return lambda scores: plan_to_targets(self.graph, scores, self.targets, predict, mode=mode,
                                              max_macs=max_macs, **self.plan_options)

    def verified(self, candidate, rebuild, teacher_macs: int, search_key=None, widen: bool = True):
        """``(candidate, its measured costs)``, searched on measurements (TFLM's arena jumps by KBs between
        neighbouring widths, so predictions corrected by one measurement do not find the edge).

        A candidate whose measurement misses a target is planned again (``rebuild(max_macs, predicted=True)``)
        under lower MACs caps: down by the miss until a plan meets every target, then between it and the nearest
        miss. With ``widen``, one that meets every target with WIDEN_ROOM to spare (and is below ``--target_macs``)
        is planned wider, past its predictions (``predicted=False``): first toward the measured anchors by their
        slope, then between the widest hit and the nearest miss, MAX_WIDENINGS plans at most. (The anchors are
        uniform cuts: their slope guides a uniform candidate; widened too, MobileNetV2's global candidates all kept
        their plans at a cost the planning budget cannot spare: docs/benchmarks/export.md.) Either search stops
        once the widest hit is within REPLAN_RESOLUTION of the MACs of the nearest miss (or of the MACs target), or
        a cap rebuilds a shape measured already; the widest measured plan that meets every target is kept.
        Candidates of one ``search_key`` (the allocation) that start from one shape (the uniform ones) replay the
        outcome of the first of them."""
        def shape_of(model_candidate):
            return tuple(sorted((group, len(kept)) for group, kept in model_candidate.keep.items()))

        def costs(model_candidate):
            measured = {"params": model_candidate.params}
            if self.targets.on_device:
                shape = shape_of(model_candidate)
                if shape not in self._measured:
                    self._measured[shape] = self._measure(model_candidate.model)
                measured.update(self._measured[shape])
            return measured

        def meets(measured):
            return all(measured[k] <= v for k, v in self.limits.items())

        def ratio(model_candidate):
            return model_candidate.macs / teacher_macs

        measured, ceiling = costs(candidate), self.targets.macs
        fits = meets(measured)
        if fits and (not widen or ratio(candidate) >= ceiling * (1 - REPLAN_RESOLUTION)
                     or _shortfall(self.limits, measured) < 1 + WIDEN_ROOM):
            return candidate, measured
        search = (search_key, shape_of(candidate))
        if search in self._searches:
            kept_cap, kept_shape = self._searches[search]
            if kept_cap is None:  # searched wider before: nothing wider measured within the targets
                return candidate, measured
            trial = rebuild(kept_cap, predicted=not fits)
            if shape_of(trial) == kept_shape and meets(costs(trial)):
                return trial, costs(trial)
        hit = (candidate, measured, None) if fits else None  # the widest measured plan that meets, and its cap
        miss = None if fits else (ratio(candidate), measured)  # the narrowest measured plan that does not
        seen = {shape_of(candidate)}
        for step in range(MAX_WIDENINGS if fits else MAX_REPLANS):
            cap = self._next_cap(hit and (ratio(hit[0]), hit[1]), miss, ceiling, step)
            trial = rebuild(cap, predicted=not fits)
            trial_costs, shape = costs(trial), shape_of(trial)
            repeated = shape in seen
            seen.add(shape)
            if meets(trial_costs):
                if hit is None or trial.macs > hit[0].macs:
                    hit = (trial, trial_costs, cap)
            elif miss is None or ratio(trial) < miss[0]:
                miss = (ratio(trial), trial_costs)
            edge = miss[0] if miss is not None else ceiling
            if hit is not None and (repeated or ratio(hit[0]) >= edge * (1 - REPLAN_RESOLUTION)):
                break
        if hit is not None:
            self._searches[search] = (hit[2], shape_of(hit[0]))
            return hit[0], hit[1]
        flags = {"params": "--target_params", "arena_bytes": "--target_arena_kb", "flash_bytes": "--target_flash_kb",
                 "latency_ms": "--target_latency_ms"}
        missed = ", ".join(f"{flags[k]} (measured {measured[k]:.4g} against {v:.4g} {'ms' if k == 'latency_ms' else ''})"
                           for k, v in self.limits.items() if measured[k] > v)
        raise MskdError(f"candidate {candidate.criterion}: no plan measured within {missed} after {MAX_REPLANS} "
                        "re-plans; raise that target (or lower --min_channels / --round_to).")

    def _next_cap(self, hit, miss, ceiling: float, step: int) -> float:
        """The next MACs cap of a measured search. ``hit`` / ``miss``: ``(MACs ratio, measured costs)`` of the
        widest plan that meets and of the narrowest that does not (None: none measured)."""
        if hit is None:  # down by the miss, faster after a second one
            return miss[0] * min(0.9, _shortfall(self.limits, miss[1])) ** (1 if step == 0 else 2)
        if miss is not None:
            return (hit[0] + miss[0]) / 2
        # Wider than every measurement yet: where the line from the hit to the nearest wider anchor reaches the
        # tightest target (arena, flash and latency all grow with the width).
        caps = []
        for key, limit in self.limits.items():
            above = [(r, m[key]) for r, m in self._anchors if key in m and r > hit[0] and m[key] > hit[1][key]]
            if above:
                r, value = min(above)
                caps.append(hit[0] + (limit - hit[1][key]) * (r - hit[0]) / (value - hit[1][key]))
        return min(ceiling, *caps) if caps else (hit[0] + ceiling) / 2
