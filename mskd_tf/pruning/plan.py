"""The planner: from per-group channel scores to kept channels, by ratio or to a MACs target.

Three ways to say how much to cut (``plan_keep``):

* ``keep_ratio=0.5, mode="uniform"``: every prunable group keeps half its channels (a dict
  ``{group id or layer name: ratio}`` sets ratios per layer); in a coupled group whose producers
  hold different slices (option-A ResNet: one stream, each stage a slice of it) every slice keeps
  its share too, so a uniform plan's widths never depend on the scores;
* ``keep_ratio=0.5, mode="global"``: channels of all groups are ranked together on scores
  normalised by their group's mean, and the top half overall is kept;
* ``target_macs=0.5``: either mode, searched (bisection, then single-unit steps) until the
  predicted MACs are within ``tolerance`` (1%) of half the original; where width steps are too coarse
  for that, the widest plan found under the target plus tolerance (the target is never exceeded).

Widths are rounded to ``round_to`` (narrow groups: a finer power of two) and never go below ``min_channels`` / ``min_ratio``; groups
containing a ``protect``-ed layer keep everything. MACs and params are predicted from the
handlers' weight-slicing table and ``flops.count`` per layer (kernel size ratio times the
layer's original MACs), so a plan costs no model building and equals ``flops.count`` of the
pruned clone.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mskd_tf.errors import MskdError
from mskd_tf.pruning.layers import MAC_WEIGHTS, STATISTIC_WEIGHTS


@dataclasses.dataclass
class Plan:
    """Kept channels per group and the predicted cost of the pruned model."""

    keep: dict  # group id -> sorted kept indices (every prunable group listed)
    macs: int
    params: int
    base_macs: int
    base_params: int

    @property
    def macs_ratio(self):
        return self.macs / self.base_macs if self.base_macs else 1.0

    def widths(self):
        return {group_id: len(kept) for group_id, kept in self.keep.items()}


class CostModel:
    """Predicts MACs and params of ``prune(model, keep)`` from a channel mask, without building it."""

    def __init__(self, graph, cost=None):
        if cost is None:
            from mskd_tf import flops  # another module of the project; imported late

            cost = flops.count(graph.model)
        self.graph = graph
        self.base_macs, self.base_params = int(cost.macs), int(cost.params)
        self._maps = {}  # (path, map name) -> slot
        ids = []
        self._layers = []  # (base macs, [(shape, labels slots, is mac, is learned)])
        covered_macs = covered_params = 0
        for path, record in graph.records.items():
            weights = getattr(record.layer, "weights", [])
            if not weights:
                continue
            axes = record.handler.weight_axes(record.layer)
            items = []
            for weight in weights:
                labels = axes.get(weight.name, ())
                slots = []
                for map_name in labels:
                    if map_name is None:
                        slots.append(None)
                        continue
                    key = (path, map_name)
                    if key not in self._maps:
                        self._maps[key] = len(ids)
                        ids.append(graph.channels(path, map_name))
                    slots.append(self._maps[key])
                shape = tuple(int(d) for d in weight.shape)
                items.append((shape, slots, weight.name in MAC_WEIGHTS, weight.name not in STATISTIC_WEIGHTS))
            layer_macs = int(cost.per_layer.get(path, (0, 0))[0]) if cost.per_layer else 0
            covered_macs += layer_macs
            covered_params += sum(math.prod(s) for s, _, _, learned in items if learned)
            self._layers.append((layer_macs, items))
        # Whatever the per-layer table does not cover (e.g. skipped nested models) stays constant.
        self._fixed_macs = self.base_macs - covered_macs
        self._fixed_params = self.base_params - covered_params
        self._lengths = np.array([len(i) for i in ids], dtype=np.int64)
        self._ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]) if ids else np.zeros(0, np.int64)

    def evaluate(self, mask):
        """(macs, params) of the model pruned to ``mask`` (a DependencyGraph.keep_mask)."""
        if self._ids.size:
            counts = np.add.reduceat(mask[self._ids].astype(np.int64), self._starts)
            counts[self._lengths == 0] = 0
        else:
            counts = np.zeros(0, dtype=np.int64)
        macs, params = float(self._fixed_macs), self._fixed_params
        for layer_macs, items in self._layers:
            old_mac_size = new_mac_size = 0
            for shape, slots, is_mac, learned in items:
                new_shape = [counts[s] if s is not None else d for d, s in zip(shape, slots)] + list(shape[len(slots):])
                size = math.prod(int(d) for d in new_shape)
                if learned:
                    params += size
                if is_mac:
                    old_mac_size += math.prod(shape)
                    new_mac_size += size
            if layer_macs:
                macs += layer_macs * (new_mac_size / old_mac_size if old_mac_size else 1.0)
        return int(round(macs)), int(params)


def plan_keep(graph, scores=None, *, keep_ratio=None, target_macs=None, mode="global", round_to=1,
              min_channels=1, min_ratio=0.0, protect=(), cost=None, tolerance=0.01):
    """Decide which channels of every prunable group to keep.

    Args:
        graph: the model's :class:`~mskd_tf.pruning.graph.DependencyGraph`.
        scores: ``{group_id: importance per group channel}`` (higher = more important); a missing
            group (or ``scores=None``) ranks its channels by index (lower index kept first).
        keep_ratio: fraction of channels to keep: a float, or ``{group id or layer name: float}``
            (``mode="uniform"`` only; unlisted groups keep all).
        target_macs: fraction (<= 1) of the original MACs, or an absolute MAC count (> 1);
            searched to within ``tolerance``. Give exactly one of ``keep_ratio``/``target_macs``.
        mode: ``"uniform"`` (the same ratio in every group) or ``"global"`` (one ranking of
            mean-normalised scores across groups).
        round_to: kept widths of a group of at least ``2 * round_to`` channels are multiples of this
            (e.g. 8 for SIMD); narrower groups use a finer power of two (see ``_Planner.step``).
        min_channels, min_ratio: the smallest width per group (and per producer layer in it).
        protect: layer names or group ids whose groups keep every channel.
        cost: a ``flops.Cost`` of the model with ``per_layer`` (computed if None).
        tolerance: relative MACs tolerance for ``target_macs``.

    Returns:
        :class:`Plan` with ``keep`` for every prunable group and the predicted MACs/params.

    Raises:
        MskdError: bad arguments, unknown names, or a target below the smallest reachable MACs.
    """
    if (keep_ratio is None) == (target_macs is None):
        raise MskdError("plan_keep: give exactly one of keep_ratio=... or target_macs=....")
    if mode not in ("uniform", "global"):
        raise MskdError(f"plan_keep: mode={mode!r} is not 'uniform' or 'global'.")
    if int(round_to) < 1 or int(min_channels) < 1 or not 0.0 <= float(min_ratio) <= 1.0:
        raise MskdError(f"plan_keep: need round_to >= 1, min_channels >= 1, 0 <= min_ratio <= 1 "
                        f"(got {round_to}, {min_channels}, {min_ratio}).")
    planner = _Planner(graph, scores or {}, int(round_to), int(min_channels), float(min_ratio), protect,
                       CostModel(graph, cost))
    if keep_ratio is not None:
        return planner.by_ratio(keep_ratio, mode)
    return planner.to_target(target_macs, mode, float(tolerance))


class _Planner:
    def __init__(self, graph, scores, round_to, min_channels, min_ratio, protect, cost_model):
        self.graph, self.cost = graph, cost_model
        self.round_to = round_to
        protected = _resolve_protect(graph, protect)
        self.groups = [g for g in graph.groups if g.prunable and g.id not in protected]
        self.protected = [g for g in graph.groups if g.prunable and g.id in protected]
        self.order, self.normalised, self.minimum = {}, {}, {}
        for group in self.groups:
            score = scores.get(group.id)
            if score is None:
                score = np.arange(group.size, 0, -1, dtype=np.float64)  # keep the lowest indices first
            score = np.asarray(score, dtype=np.float64).reshape(-1)
            if score.shape != (group.size,) or not np.all(np.isfinite(score)):
                raise MskdError(f"scores[{group.id!r}] must be {group.size} finite numbers, got shape {score.shape}.")
            self.order[group.id] = np.argsort(-score, kind="stable")
            scale = np.mean(np.abs(score))
            self.normalised[group.id] = score / scale if scale > 0 else np.ones_like(score)
            self.minimum[group.id] = min(group.size, max(min_channels, math.ceil(min_ratio * group.size)))
        self.parts = {g.id: _slice_parts(g) for g in self.groups}
        self.min_channels, self.min_ratio = min_channels, min_ratio
        self.scores = scores

    # -- widths -> kept indices -> cost -------------------------------------------------
    def step(self, group) -> int:
        """The width granularity of ``group``: ``round_to``, or for a group narrower than ``2 * round_to`` the
        largest power of two up to half its size (12 channels: 4, so 4 / 8 / 12).

        Rounded to ``round_to`` a narrow group has one choice left (8 of 12, or all; under 8, all), so with the
        default of 8 a tiny model could not reach a MACs target at all; halving keeps at least two choices
        and even widths.
        """
        if group.size >= 2 * self.round_to:
            return self.round_to
        return max(1, min(self.round_to, 2 ** int(math.floor(math.log2(max(group.size, 2) / 2)))))

    def _width(self, group, n):
        step = self.step(group)
        n = step * int(round(n / step))
        lowest = step * math.ceil(self.minimum[group.id] / step)
        return int(min(group.size, max(n, lowest)))

    def _keep(self, widths, uniform=False):
        keep = {g.id: np.arange(g.size) for g in self.protected}
        for group in self.groups:
            order = self.order[group.id]
            if uniform and len(self.parts[group.id]) > 1:
                chosen = self._share_by_slice(group, order, widths[group.id])
            else:
                chosen = set(order[: widths[group.id]].tolist())
            # Every producer in a coupled group keeps at least its minimum too (option-A shortcuts).
            for ref in group.producers:
                member = np.unique(ref.indices)
                need = min(len(member), max(self.min_channels, math.ceil(self.min_ratio * len(member))))
                have = [i for i in member.tolist() if i in chosen]
                if len(have) < need:
                    ranked = [i for i in order.tolist() if i in set(member.tolist()) and i not in chosen]
                    chosen.update(ranked[: need - len(have)])
            if self.step(group) > 1:
                self._round_producers(group, order, chosen)
            keep[group.id] = np.array(sorted(chosen), dtype=np.int64)
        return keep

    def _share_by_slice(self, group, order, width):
        """Every slice keeps ``width / group.size`` of its channels, rounded like a group width; top-ranked within it.

        Ranked over the whole group, ResNet-20's stream kept 8 of stage 1's 16 channels under one
        ranking and 16 under another at the same width, so two criteria's "uniform" plans differed
        by 26% in params. Rounding each slice (not the sum) keeps every layer's width a multiple of
        the step nearest the common ratio, as Torch-Pruning's uniform ratio does per layer.
        """
        step = self.step(group)
        chosen = set()
        for part in self.parts[group.id]:
            share = min(len(part), step * int(round(width * len(part) / group.size / step)))
            members = set(part)
            chosen.update([i for i in order.tolist() if i in members][:share])
        return chosen

    def _round_producers(self, group, order, chosen):
        """Give every producer of a coupled group a kept count that is a multiple of the group's ``step``.

        With option-A shortcuts the residual stream of every stage is one group (ResNet-20: 64
        channels, the 16-channel stage-1 layers a slice of it), so rounding the group's width
        alone leaves the slices odd (7, 17): on oneDNN such a student trained at 341 ms/step
        against 170 ms/step with 8/16 (the same MACs). Counts only grow, up to the slice size.
        """
        step = self.step(group)
        members = sorted({tuple(np.unique(ref.indices).tolist()) for ref in group.producers}, key=len)
        members = [set(m) for m in members]
        for _ in range(len(members) + 1):  # fixed point: growing a wide slice can touch a narrow one
            changed = False
            for position, member in enumerate(members):
                have = len(member & chosen)
                want = min(len(member), step * math.ceil(have / step))
                if have >= want:
                    continue
                narrower = set().union(*(m for m in members[:position] if m < member))
                # Best-ranked missing channels, outside the narrower slices first so those stay rounded.
                ranked = [i for i in order.tolist() if i in member and i not in chosen]
                ranked.sort(key=lambda i: i in narrower)
                chosen.update(ranked[: want - have])
                changed = True
            if not changed:
                return

    def _plan(self, widths, uniform=False):
        keep = self._keep(widths, uniform)
        macs, params = self.cost.evaluate(self.graph.keep_mask(keep))
        return Plan(keep, macs, params, self.cost.base_macs, self.cost.base_params)

    def _uniform_widths(self, ratio):
        return {g.id: self._width(g, ratio * g.size) for g in self.groups}

    def _global_widths(self, threshold):
        return {g.id: self._width(g, int(np.sum(self.normalised[g.id] >= threshold))) for g in self.groups}

    # -- the three requests --------------------------------------------------------------
    def by_ratio(self, keep_ratio, mode):
        if isinstance(keep_ratio, dict):
            if mode != "uniform":
                raise MskdError("plan_keep: a per-layer keep_ratio dict needs mode='uniform'.")
            ratios = _resolve_ratios(self.graph, keep_ratio)
            widths = {g.id: (self._width(g, ratios[g.id] * g.size) if g.id in ratios else g.size)
                      for g in self.groups}
            return self._plan(widths, uniform=True)
        ratio = _check_ratio(keep_ratio)
        if mode == "uniform":
            return self._plan(self._uniform_widths(ratio), uniform=True)
        pooled = np.sort(np.concatenate([self.normalised[g.id] for g in self.groups] or [np.zeros(0)]))[::-1]
        if not pooled.size:
            return self._plan({})
        threshold = pooled[max(0, min(len(pooled) - 1, int(round(ratio * len(pooled))) - 1))]
        return self._plan(self._global_widths(threshold))

    def to_target(self, target_macs, mode, tolerance):
        target = float(target_macs)
        if target <= 0:
            raise MskdError(f"plan_keep: target_macs={target_macs} must be > 0 (a fraction <= 1 or a MAC count).")
        goal = target * self.cost.base_macs if target <= 1 else target
        uniform = mode == "uniform"
        smallest = self._plan({g.id: self._width(g, 0) for g in self.groups}, uniform)
        if smallest.macs > goal * (1 + tolerance):
            raise MskdError(
                f"plan_keep: target_macs={target_macs} ({goal / 1e6:.3f}M MACs) is unreachable: the smallest "
                f"reachable is {smallest.macs / 1e6:.3f}M MACs ({smallest.macs_ratio:.1%} of the original "
                f"{self.cost.base_macs / 1e6:.3f}M) with min_channels={self.min_channels}, "
                f"min_ratio={self.min_ratio}, round_to={self.round_to} and the protected layers. "
                "Raise target_macs or lower those limits."
            )
        if mode == "uniform":
            widths_of, lo, hi = self._uniform_widths, 0.0, 1.0  # larger ratio -> more MACs
        else:
            pooled = np.concatenate([self.normalised[g.id] for g in self.groups] or [np.zeros(1)])
            top, bottom = float(pooled.max()), float(pooled.min())
            widths_of, lo, hi = (lambda t: self._global_widths(top - t)), 0.0, top - bottom + 1e-9
        best = None
        for _ in range(50):  # bisection on a monotone knob: MACs grow with it
            mid = (lo + hi) / 2
            plan = self._plan(widths_of(mid), uniform)
            if best is None or abs(plan.macs - goal) < abs(best[0].macs - goal):
                best = (plan, widths_of(mid))
            if plan.macs > goal:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-7:
                break
        plan, widths = best
        return self._refine(plan, widths, goal, tolerance, uniform)

    def _refine(self, plan, widths, goal, tolerance, uniform):
        """Single-unit width steps (one ``step`` in one group) while they bring MACs closer; a plan the steps
        leave above ``goal * (1 + tolerance)`` is then cut under it, so the target is a budget the student
        never exceeds (in a tiny or coarsely rounded network one step can be several percent of the MACs)."""
        for _ in range(64):
            if abs(plan.macs - goal) <= tolerance * goal:
                break
            grow = plan.macs < goal
            candidates = self._steps(widths, uniform, grow)
            if not candidates:
                break
            new_plan, new_widths = min(candidates, key=lambda c: abs(c[0].macs - goal))
            if abs(new_plan.macs - goal) >= abs(plan.macs - goal):
                break
            plan, widths = new_plan, new_widths
        cap = goal * (1 + tolerance)
        if plan.macs <= cap:
            return plan
        while plan.macs > cap:  # the smallest plan fits (checked in to_target), so this ends
            plan, widths = max(self._steps(widths, uniform, grow=False), key=lambda c: c[0].macs)
        while True:  # then widen again wherever one step still fits
            fitting = [c for c in self._steps(widths, uniform, grow=True) if c[0].macs <= cap]
            if not fitting:
                return plan
            plan, widths = max(fitting, key=lambda c: c[0].macs)

    def _steps(self, widths, uniform, grow):
        """(plan, widths) for each group moved one ``step`` wider (``grow``) or narrower, within its limits."""
        candidates = []
        for group in self.groups:
            width = widths[group.id] + (self.step(group) if grow else -self.step(group))
            if width > group.size or width < self.minimum[group.id] or width == widths[group.id]:
                continue
            trial = dict(widths, **{group.id: width})
            candidates.append((self._plan(trial, uniform), trial))
        return candidates


def _slice_parts(group):
    """The group's channels split by which producers hold them: one part for an ordinary group;
    for ResNet-20's option-A stream [0-15] (every stage), [16-31] (stages 2-3), [32-63] (stage 3)."""
    holders = {}
    for number, ref in enumerate(group.producers):
        for index in np.unique(ref.indices).tolist():
            holders.setdefault(index, set()).add(number)
    parts = {}
    for index in range(group.size):
        parts.setdefault(frozenset(holders.get(index, ())), []).append(index)
    return list(parts.values())


def _check_ratio(ratio):
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise MskdError(f"plan_keep: keep_ratio={ratio} must be in (0, 1].")
    return ratio


def prunable_layer_names(graph) -> list[str]:
    """Names ``protect`` accepts: the layers producing the channels of prunable groups, in graph order."""
    names = []
    for group in graph.groups:
        if group.prunable:
            names += [r.layer for r in group.producers if r.layer not in names]
    return names


def unknown_protect_message(graph, protect) -> str | None:
    """Why ``protect`` names no prunable channels (listing a few valid names), or None when every name is valid."""
    if isinstance(protect, str):
        protect = [protect]
    unknown = [name for name in protect if not _groups_named(graph, name)]
    if not unknown:
        return None
    valid = prunable_layer_names(graph)
    listed = ", ".join(valid[:8]) + (f" ... ({len(valid) - 8} more)" if len(valid) > 8 else "")
    return (f"{', '.join(repr(n) for n in unknown)} {'is' if len(unknown) == 1 else 'are'} neither a group id nor a "
            f"layer producing a group's channels in model {graph.model.name!r}; prunable layers: "
            f"{listed or 'none'}.")


def _resolve_protect(graph, protect):
    if isinstance(protect, str):
        protect = [protect]
    message = unknown_protect_message(graph, protect)
    if message:
        raise MskdError(f"protect: {message}")
    return {g.id for name in protect for g in _groups_named(graph, name)}


def _resolve_ratios(graph, ratios):
    resolved = {}
    for name, ratio in ratios.items():
        hits = _groups_named(graph, name)
        if not hits:
            raise MskdError(f"keep_ratio: {name!r} is neither a group id nor a layer producing a group's channels.")
        for group in hits:
            resolved[group.id] = min(resolved.get(group.id, 1.0), _check_ratio(ratio))
    return resolved


def _groups_named(graph, name):
    """Groups with id ``name`` or with ``name`` among their producer layers."""
    return [g for g in graph.groups if g.id == name or any(r.layer == name for r in g.producers)]
