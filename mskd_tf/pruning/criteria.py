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

All data-driven criteria share one pass over the calibration batches
(:mod:`mskd_tf.pruning.activation_statistics`); this module turns its per-channel means into
group scores. Candidates (one pruned clone per ranking) are built in
:mod:`mskd_tf.pruning.candidates`; ``rankings.json`` (:mod:`mskd_tf.pruning.rankings`) is the rank stage's record of them.

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
import zlib

import numpy as np
from keras import ops

from mskd_tf.errors import MskdError
from mskd_tf.pruning.activation_statistics import channel_means, tap_refs
from mskd_tf.pruning.graph import build_graph
from mskd_tf.pruning.layers import MAC_WEIGHTS


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
            labels for a gradient criterion.
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
        means = channel_means(model, graph, groups, data_driven, calibration, num_batches, loss)
        for criterion in data_driven:
            rankings[criterion.name] = {
                group.id: _checked(criterion.name, group, aggregate(
                    group, [(ref, means[criterion.name][ref.layer][ref.positions]) for ref in tap_refs(group)]))
                for group in groups}
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
