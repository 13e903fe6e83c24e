"""Channel-importance criteria: MS-KD ranks the same network several ways (a registry of functions).

Every criterion gives one score per channel of every prunable group of a
:class:`~mskd_tf.pruning.graph.DependencyGraph`; higher means more important (kept first).

Built-in criteria (``REGISTRY``):

============  ==========  =================================================================
name          data        score of a channel, per layer
============  ==========  =================================================================
``l1``        no          L1 norm of the filter producing it (Li et al., 2017)
``l2``        no          L2 norm of that filter
``fpgm``      no          sum of Euclidean distances from the filter to the layer's other
                          filters: the paper's approximation of the distance to the
                          geometric median (He et al., 2019); near the median = redundant
``bn_gamma``  no          |gamma| of the BatchNormalization on it (network slimming, Liu et
                          al., 2017); a group with no BN (or ``scale=False``) falls back to l1
``random``    no          uniform random, seeded by ``seed`` and the group id: a control
``apoz``      yes         1 - average percentage of zeros after the activation (Hu et al.)
``activation`` yes        mean |activation|
``taylor``    yes         mean over samples of |spatial mean of activation x dLoss/dactivation|
                          (first-order Taylor, Molchanov et al., 2017); loss = per-sample
                          sparse cross-entropy from the logits, summed over the batch
``hrank``     yes         mean rank of the HxW feature map (Lin et al., 2020); rank as
                          ``numpy.linalg.matrix_rank`` (tol = s_max * max(H, W) * eps32)
============  ==========  =================================================================

Which layers: l1/l2/fpgm read the group's producers (the kernel axis labelled ``"out"`` by
the layer's handler, so Conv, Dense, ConvTranspose and SeparableConv all work); bn_gamma its
BatchNormalizations; data-driven criteria read the group's activation layers (ReLU, ...),
or, if it has none, its last per-channel layer's output, else its producers' outputs.

Coupled groups (residual ``Add``, option-A shortcuts) get one score per channel: each
layer's per-channel scores (positions of one channel summed) are divided by their mean over
that layer's channels, then averaged over the layers that carry the channel. Normalising
first matters because raw magnitudes differ between layers by far more than between channels
(an L1 norm grows with fan-in, activations with depth), and the unnormalised sum would just
copy the ranking of the largest-scaled layer. The mean (rather than the max) keeps one
outlier channel from squashing the rest of its layer. Channels that no contributing layer
carries score 0.

All data-driven criteria share one pass over the calibration batches: one multi-output
``keras.Model`` returns the logits and every tapped activation; ``tf.GradientTape`` gives
the gradients w.r.t. those activations only when a criterion needs them.

User criteria: decorate a plain function with :func:`register_criterion`:

* data-free (``needs_data=False``): ``fn(group, context) -> np.ndarray`` of ``group.size``
  scores, where ``group`` is a :class:`~mskd_tf.pruning.graph.ChannelGroup` and ``context`` a
  :class:`CriterionContext` (``graph``, ``model``, ``seed``, ``layer_weights(ref)``); use
  :func:`aggregate` to combine per-layer values the same way the built-ins do;
* data-driven (``needs_data=True``): ``fn(activation, gradient) -> tensor of shape (C,)``,
  called on every batch for every tapped tensor (``activation`` is ``(B, ..., C)``,
  ``gradient`` the same shape or None unless ``needs_gradient=True``), written with
  ``keras.ops``; it returns the batch's mean per channel. Batches are averaged (weighted by
  size), then normalised and aggregated per group like the built-ins.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import zlib

import keras
import numpy as np
from keras import ops

from mskd_tf.errors import MskdError
from mskd_tf.pruning.graph import build_graph
from mskd_tf.pruning.layers import MAC_WEIGHTS
from mskd_tf.training import outputs_probabilities
from mskd_tf.workdir import write_atomic

RANKINGS_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``fn`` and what it needs (see the module docstring)."""

    name: str
    fn: object
    needs_data: bool = False
    needs_gradient: bool = False
    max_samples: int | None = None  # data-driven: stop accumulating after this many samples


REGISTRY: dict[str, Criterion] = {}


def register_criterion(name, *, needs_data=False, needs_gradient=False, max_samples=None):
    """Decorator registering ``fn`` as criterion ``name`` (returns ``fn`` unchanged).

    Data-free: ``fn(group, context) -> np.ndarray`` with one score per group channel.
    Data-driven (``needs_data=True``): ``fn(activation, gradient) -> (C,)`` per-batch channel
    means in ``keras.ops``; ``gradient`` is dLoss/dactivation if ``needs_gradient`` else None.
    ``max_samples`` caps the calibration samples a costly data-driven criterion looks at
    (whole batches, at least one). Higher scores mean more important. Re-registering a name
    replaces the old criterion.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise MskdError(f"register_criterion: name {name!r} must be an identifier-like string (it names files).")
    if needs_gradient and not needs_data:
        raise MskdError(f"register_criterion({name!r}): needs_gradient=True requires needs_data=True.")

    def decorate(fn):
        REGISTRY[name] = Criterion(name, fn, bool(needs_data), bool(needs_gradient),
                                   None if max_samples is None else int(max_samples))
        return fn

    return decorate


@dataclasses.dataclass
class CriterionContext:
    """What a data-free criterion may look at besides its group."""

    graph: object
    model: object
    seed: int = 0

    def layer_weights(self, ref, names=MAC_WEIGHTS):
        """Weights of ``ref.layer`` labelled with ``ref.map`` on some axis, as ``(positions, -1)``.

        Only weights whose name is in ``names`` are returned (default: the MAC kernels), each
        with the channel axis moved first and the other axes flattened, rows = ``ref.positions``.
        """
        record = self.graph.records[ref.layer]
        axes = record.handler.weight_axes(record.layer)
        found = []
        for weight in record.layer.weights:
            labels = axes.get(weight.name, ())
            if weight.name not in names or ref.map not in labels:
                continue
            value = np.moveaxis(np.asarray(weight.numpy()), labels.index(ref.map), 0)
            found.append(value.reshape(value.shape[0], -1)[ref.positions].astype(np.float64))
        return found


def aggregate(group, per_layer):
    """One score per group channel from per-position values on several layers.

    Args:
        group: the :class:`ChannelGroup`.
        per_layer: iterable of ``(ref, values)``: ``values[i]`` scores ``ref.positions[i]``.

    Returns:
        ``np.ndarray`` of ``group.size``: per layer, positions of a channel are summed and the
        layer's channel scores divided by their mean; then averaged over the layers carrying
        each channel (see the module docstring for why).
    """
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    for ref, values in per_layer:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape != (len(ref.positions),):
            raise MskdError(f"criterion values for layer {ref.layer!r} have shape {values.shape}; "
                            f"expected ({len(ref.positions)},), one per channel position.")
        channel = np.zeros(group.size)
        np.add.at(channel, ref.indices, values)
        carried = np.unique(ref.indices)
        scale = np.mean(np.abs(channel[carried]))
        if scale > 0:
            channel /= scale
        total[carried] += channel[carried]
        count[carried] += 1
    return total / np.maximum(count, 1)


# --------------------------------------------------------------------------- data-free


def _filter_reduce(group, context, reduce):
    per_layer = []
    for ref in group.producers:
        for filters in context.layer_weights(ref):
            per_layer.append((ref, reduce(filters)))
    return aggregate(group, per_layer)


@register_criterion("l1")
def l1_norm(group, context):
    """Filter L1 norm (Li et al., 2017)."""
    return _filter_reduce(group, context, lambda f: np.abs(f).sum(axis=1))


@register_criterion("l2")
def l2_norm(group, context):
    """Filter L2 norm."""
    return _filter_reduce(group, context, lambda f: np.sqrt(np.square(f).sum(axis=1)))


def _distance_sum(filters):
    squared = np.square(filters).sum(axis=1)
    gram = filters @ filters.T
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0.0))
    return distances.sum(axis=1)


@register_criterion("fpgm")
def fpgm(group, context):
    """Sum of distances to the layer's other filters (He et al., 2019): low = near the geometric median."""
    return _filter_reduce(group, context, _distance_sum)


@register_criterion("bn_gamma")
def bn_gamma(group, context):
    """|gamma| of the group's BatchNormalization layers (Liu et al., 2017); l1 without BN."""
    per_layer = []
    for ref in group.batchnorms:
        layer = context.graph.get_layer(ref.layer)
        if getattr(layer, "gamma", None) is not None:
            per_layer.append((ref, np.abs(np.asarray(layer.gamma.numpy()))[ref.positions]))
    if not per_layer:
        return l1_norm(group, context)
    return aggregate(group, per_layer)


@register_criterion("random")
def random_scores(group, context):
    """Uniform random scores: the control every criterion should beat."""
    rng = np.random.default_rng([int(context.seed), zlib.crc32(group.id.encode())])
    return rng.random(group.size)


# --------------------------------------------------------------------------- data-driven


def _spatial_axes(tensor):
    return tuple(range(1, len(tensor.shape) - 1))


@register_criterion("apoz", needs_data=True)
def apoz(activation, gradient):
    """1 - average percentage of zeros per channel."""
    return ops.mean(ops.cast(ops.not_equal(activation, 0), "float32"), axis=tuple(range(len(activation.shape) - 1)))


@register_criterion("activation", needs_data=True)
def mean_activation(activation, gradient):
    """Mean |activation| per channel."""
    return ops.mean(ops.abs(activation), axis=tuple(range(len(activation.shape) - 1)))


@register_criterion("taylor", needs_data=True, needs_gradient=True)
def taylor(activation, gradient):
    """Per sample |spatial mean of activation x gradient|, averaged over the batch (Molchanov et al., 2017)."""
    product = activation * gradient
    axes = _spatial_axes(activation)
    if axes:
        product = ops.mean(product, axis=axes)
    return ops.mean(ops.abs(product), axis=0)


# HRank's own finding is that the average rank of a filter's maps is stable after a few hundred
# images; ranks cost one eigen-decomposition per map, so 512 samples bound its time.
@register_criterion("hrank", needs_data=True, max_samples=512)
def hrank(activation, gradient):
    """Mean matrix rank of each channel's HxW feature map (Lin et al., 2020).

    Rank = singular values above ``s_max * max(H, W) * eps(float32)`` (numpy's matrix_rank
    rule for float32 maps). Singular values come from the eigenvalues of the float64 Gram
    matrix, 4x faster than TF's batched SVD on CPU and exact to ~1e-8 * s_max, far below
    that tolerance.
    """
    import tensorflow as tf  # eigvalsh has no keras.ops equivalent

    if len(activation.shape) != 4:  # a vector or scalar per channel: rank is 1 unless all zero
        axes = _spatial_axes(activation)
        nonzero = ops.not_equal(activation, 0)
        if axes:
            nonzero = ops.any(nonzero, axis=axes)
        return ops.mean(ops.cast(nonzero, "float32"), axis=0)
    maps = tf.cast(tf.transpose(activation, (0, 3, 1, 2)), tf.float64)
    height, width = activation.shape[1], activation.shape[2]
    gram = tf.matmul(maps, maps, transpose_a=height >= width, transpose_b=height < width)
    singular = tf.sqrt(tf.maximum(tf.linalg.eigvalsh(gram), 0.0))  # (B, C, min(H, W)), ascending
    tolerance = singular[..., -1:] * (max(height, width) * float(np.finfo(np.float32).eps))
    ranks = tf.reduce_sum(tf.cast(singular > tolerance, tf.float32), axis=-1)
    return tf.reduce_mean(ranks, axis=0)


# --------------------------------------------------------------------------- rank()


def rank(model, criteria, calibration=None, *, graph=None, num_batches=10, seed=0, loss=None):
    """Score every prunable group's channels with each criterion.

    Args:
        model: a functional Keras model (the trained teacher).
        criteria: criterion names (``REGISTRY`` keys) or one name.
        calibration: a ``tf.data.Dataset`` (or iterable) of ``(images, int labels)`` batches,
            required by data-driven criteria; labels are needed by gradient criteria only.
        graph: ``build_graph(model)`` if already built.
        num_batches: calibration batches to use (all data-driven criteria share the pass).
        seed: seed of the ``random`` criterion.
        loss: ``loss(labels, outputs) -> per-sample losses`` for gradient criteria; default
            sparse categorical cross-entropy from logits (from probabilities if the model's
            last layer applies softmax).

    Returns:
        ``{criterion: {group_id: np.ndarray of group.size}}`` for every prunable group,
        higher = more important.

    Raises:
        MskdError: unknown criterion, data-driven criterion without calibration data, no
            labels for a gradient criterion, or a layer inside a nested model to tap.
    """
    names = [criteria] if isinstance(criteria, str) else list(criteria)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise MskdError(f"criteria: unknown {unknown}; registered are {sorted(REGISTRY)}." if unknown
                        else "criteria: give at least one criterion name.")
    graph = graph if graph is not None else build_graph(model)
    if graph.model is not model:
        raise MskdError("rank(): `graph` was built from a different model; pass graph=build_graph(model).")
    groups = [g for g in graph.groups if g.prunable]
    context = CriterionContext(graph, model, seed)
    rankings = {}
    data_driven = [REGISTRY[n] for n in dict.fromkeys(names) if REGISTRY[n].needs_data]
    if data_driven:
        if calibration is None:
            listed = ", ".join(repr(c.name) for c in data_driven)
            verb = "is" if len(data_driven) == 1 else "are"
            raise MskdError(f"criterion {listed} {verb} data-driven: pass calibration data "
                            "(a tf.data dataset of (images, labels) batches from the training split), "
                            "or choose data-free criteria (l1, l2, fpgm, bn_gamma, random).")
        rankings.update(_data_driven_scores(model, graph, groups, data_driven, calibration, num_batches, loss))
    for name in dict.fromkeys(names):
        criterion = REGISTRY[name]
        if criterion.needs_data:
            continue
        rankings[name] = {group.id: _checked(name, group, criterion.fn(group, context)) for group in groups}
    return {name: rankings[name] for name in dict.fromkeys(names)}


def _checked(name, group, score):
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if score.shape != (group.size,):
        raise MskdError(f"criterion {name!r} returned {score.size} scores for group {group.id!r}; "
                        f"it must return one per channel ({group.size}).")
    if not np.all(np.isfinite(score)):
        raise MskdError(f"criterion {name!r} gave non-finite scores for group {group.id!r} (layers "
                        f"{group.layers[:4]}): the model produces NaN/inf on the calibration data.")
    return score


def _tap_refs(group):
    """Where to read a group's feature maps: activations, else last per-channel layer, else producers."""
    if group.activations:
        return group.activations
    if group.channelwise:
        last = group.channelwise[-1].layer
        return tuple(r for r in group.channelwise if r.layer == last)
    return group.producers


def _output_tensor(graph, path):
    if "/" in path:
        raise MskdError(f"layer {path!r} is inside a nested model; data-driven criteria read flat models "
                        "only. Rebuild the model without nesting, or use data-free criteria.")
    nodes = getattr(graph.get_layer(path), "_inbound_nodes", [])
    if not nodes:
        raise MskdError(f"layer {path!r} has never been called; cannot read its output.")
    return nodes[0].outputs[0]


def _default_loss(model):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model), reduction="none")


def _split_batch(batch):
    if isinstance(batch, dict):
        raise MskdError("calibration batches must be (images, labels) tuples, not dicts.")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _data_driven_scores(model, graph, groups, criteria, calibration, num_batches, loss):
    import tensorflow as tf  # the gradient tape; this project runs on the TF backend

    if int(num_batches) < 1:
        raise MskdError(f"num_batches={num_batches} must be >= 1.")
    taps = {}  # layer path -> index in the probe's tap outputs
    for group in groups:
        for ref in _tap_refs(group):
            taps.setdefault(ref.layer, len(taps))
    tensors = [_output_tensor(graph, path) for path in taps]
    from mskd_tf.pruning.graph import functional_of

    functional = functional_of(model)
    if len(functional.outputs) != 1 and loss is None:
        if any(c.needs_gradient for c in criteria):
            raise MskdError(f"model {model.name!r} has {len(functional.outputs)} outputs; pass loss=... "
                            "for gradient criteria.")
    probe = keras.Model(functional.inputs, [functional.outputs[0], *tensors], name="criteria_probe")
    need_gradient = any(c.needs_gradient for c in criteria)
    loss_fn = loss if loss is not None else _default_loss(model)

    def step(images, labels, active):
        if any(criteria[i].needs_gradient for i in active):
            with tf.GradientTape() as tape:
                tape.watch(images)  # records every op, also when the model's weights are frozen
                outputs = probe(images, training=False)
                total = tf.reduce_sum(loss_fn(labels, outputs[0]))
            gradients = tape.gradient(total, outputs[1:])
        else:
            outputs = probe(images, training=False)
            gradients = [None] * len(tensors)
        return [[criteria[i].fn(a, g if criteria[i].needs_gradient else None)
                 for a, g in zip(outputs[1:], gradients)] for i in active]

    traced = {}  # active criteria -> tf.function: a capped criterion drops out with one retrace
    sums = [[0.0] * len(tensors) for _ in criteria]
    seen = [0] * len(criteria)
    for batch in itertools.islice(calibration, int(num_batches)):
        images, labels = _split_batch(batch)
        if need_gradient and labels is None:
            names = [c.name for c in criteria if c.needs_gradient]
            raise MskdError(f"criteria {names} need labels: calibration batches must be (images, labels).")
        size = int(tf.shape(images)[0])
        labels = labels if labels is not None else tf.zeros([size], tf.int64)
        active = tuple(i for i, c in enumerate(criteria) if c.max_samples is None or seen[i] < c.max_samples)
        if not active:
            break
        if active not in traced:
            traced[active] = tf.function(functools.partial(step, active=active), reduce_retracing=True)
        values = traced[active](tf.convert_to_tensor(images, probe.inputs[0].dtype), labels)
        for i, per_tap in zip(active, values):
            for j, value in enumerate(per_tap):
                sums[i][j] = sums[i][j] + size * np.asarray(value, dtype=np.float64)
            seen[i] += size
    if not any(seen):
        raise MskdError("calibration data is empty: it yielded no batches.")
    rankings = {}
    for i, criterion in enumerate(criteria):
        means = [s / seen[i] for s in sums[i]]
        scores = {}
        for group in groups:
            per_layer = [(ref, means[taps[ref.layer]][ref.positions]) for ref in _tap_refs(group)]
            scores[group.id] = _checked(criterion.name, group, aggregate(group, per_layer))
        rankings[criterion.name] = scores
    return rankings


# --------------------------------------------------------------------------- artifacts


def save_rankings(path, rankings, graph):
    """Write ``rankings`` to ``path`` (JSON) atomically: a temp file in the same folder, renamed.

    The file holds, per group, its size and the layer names it touches (so the ranking can be
    read against the model), and per criterion the scores of every group.
    """
    groups = {}
    for scores in rankings.values():
        for group_id in scores:
            if group_id not in groups:
                group = graph.group(group_id)
                groups[group_id] = {"size": group.size, "producers": [r.layer for r in group.producers],
                                    "layers": group.layers}
    payload = {
        "format": RANKINGS_FORMAT,
        "model": graph.model.name,
        "groups": groups,
        "criteria": {name: {g: [float(v) for v in np.asarray(s).reshape(-1)] for g, s in scores.items()}
                     for name, scores in rankings.items()},
    }
    write_atomic(path, json.dumps(payload, indent=1))


def load_rankings(path, graph=None):
    """Read a ``rankings.json``: ``{criterion: {group_id: np.ndarray}}``.

    With ``graph``, checks that every group exists in it with the same size (the rankings
    belong to this model) and raises :class:`MskdError` naming the first mismatch.
    """
    try:
        with open(path) as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise MskdError(f"rankings file {path} does not exist; run the rank stage first.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MskdError(f"rankings file {path} is not valid JSON ({exc}); "
                        "delete it and rerun the rank stage.") from None
    if not isinstance(payload, dict) or payload.get("format") != RANKINGS_FORMAT or "criteria" not in payload:
        raise MskdError(f"rankings file {path} is not a format-{RANKINGS_FORMAT} rankings file; "
                        "delete it and rerun the rank stage.")
    rankings = {name: {g: np.asarray(v, dtype=np.float64) for g, v in scores.items()}
                for name, scores in payload["criteria"].items()}
    if graph is not None:
        for name, scores in rankings.items():
            for group_id, score in scores.items():
                try:
                    size = graph.group(group_id).size
                except MskdError:
                    raise MskdError(f"rankings file {path}: group {group_id!r} (criterion {name!r}) is not in "
                                    f"model {graph.model.name!r}; the file belongs to another model. "
                                    "Delete it and rerun the rank stage.") from None
                if size != score.size:
                    raise MskdError(f"rankings file {path}: group {group_id!r} has {score.size} scores but the "
                                    f"model's group has {size} channels; rerun the rank stage.")
    return rankings


def jaccard(keep_a, keep_b):
    """Overlap |A & B| / |A | B| of two keep dicts' kept channels (``(group, index)`` pairs, all groups).

    Groups missing from one dict count as keeping nothing there; two empty sets give 1.0.
    """
    def pairs(keep):
        return {(g, int(i)) for g, kept in keep.items() for i in np.asarray(kept).reshape(-1)}

    a, b = pairs(keep_a), pairs(keep_b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


# --------------------------------------------------------------------------- candidates


@dataclasses.dataclass
class Candidate:
    """One slimmer clone: the ranking it came from, its plan, cost and accuracy before fine-tuning."""

    criterion: str
    model: object
    keep: dict
    macs: int
    params: int
    widths: dict  # producer layer name -> output channels it keeps
    accuracy: float | None = None

    def row(self):
        """JSON-ready summary (no model)."""
        return {"criterion": self.criterion, "macs": self.macs, "params": self.params,
                "widths": self.widths, "accuracy": self.accuracy}


def build_candidates(model, rankings, *, target_macs, graph=None, evaluate=None, adapt=None, **plan_options):
    """One pruned clone per criterion, all at the same MACs target.

    Args:
        model: the model the rankings were computed on (not modified).
        rankings: ``{criterion: {group_id: scores}}`` from :func:`rank` / :func:`load_rankings`.
        target_macs: fraction of the model's MACs (or absolute MACs), see ``plan_keep``.
        graph: ``build_graph(model)`` if already built.
        evaluate: optional ``fn(clone) -> accuracy`` run on each clone before any fine-tuning.
        adapt: optional ``fn(clone)`` run on each clone first (e.g. BatchNorm recalibration).
        **plan_options: passed to ``plan_keep`` (``mode``, ``round_to``, ``min_channels``, ``protect``...).

    Returns:
        list of :class:`Candidate` in the order of ``rankings``; MACs and params are those of
        ``flops.count`` on the built clone.
    """
    from mskd_tf import flops
    from mskd_tf.pruning.clone import prune
    from mskd_tf.pruning.plan import plan_keep

    graph = graph if graph is not None else build_graph(model)
    cost = flops.count(model)
    candidates = []
    for name, scores in rankings.items():
        plan = plan_keep(graph, scores, target_macs=target_macs, cost=cost, **plan_options)
        clone = prune(model, plan.keep, graph=graph)
        clone_cost = flops.count(clone)
        if adapt is not None:
            adapt(clone)
        accuracy = float(evaluate(clone)) if evaluate is not None else None
        candidates.append(Candidate(name, clone, plan.keep, int(clone_cost.macs), int(clone_cost.params),
                                    layer_widths(graph, plan.keep), accuracy))
    return candidates


def layer_widths(graph, keep):
    """``{producer layer: output channels kept}`` over prunable groups, in graph order.

    Per layer, not per group: an option-A shortcut couples stages of different widths.
    """
    widths = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        kept = np.asarray(keep.get(group.id, np.arange(group.size)))
        for ref in group.producers:
            widths[ref.layer] = int(np.isin(ref.indices, kept).sum())
    return widths


def overlap_matrix(keeps):
    """Pairwise :func:`jaccard` overlaps ``{a: {b: overlap}}`` of ``{criterion: keep dict}``.

    Rendered by :func:`mskd_tf.report.overlap_table`.
    """
    return {a: {b: jaccard(keeps[a], keeps[b]) for b in keeps} for a in keeps}
