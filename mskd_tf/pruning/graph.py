"""Channel dependency graph of a Keras 3 functional model: which channels must go together.

Interface (used by ``criteria.py``, ``activation_statistics.py``, ``plan.py``, ``candidates.py``, ``clone.py``)::

    graph = build_graph(model, skip=())          # -> DependencyGraph
    for group in graph.groups:                    # list[ChannelGroup], topological order
        group.id          # stable str: path of the group's first producer layer, e.g. "conv2d_3"
        group.size        # number of channels (the unit of pruning) in the group
        group.prunable    # False for groups touching the input, a model output or a skipped layer
        group.reason      # why not prunable ("" when prunable)
        group.producers   # ChannelRefs on layers whose *output* channels are the group's:
                          #   Conv*/Dense/SeparableConv/ConvTranspose filters (kernel last axis)
        group.channelwise # ChannelRefs on per-channel layers on the group: BatchNormalization,
                          #   LayerNormalization, DepthwiseConv (its kernel axis -2), PReLU, ...
        group.batchnorms  # the BatchNormalization subset of ``channelwise`` (gamma = weights[0])
        group.consumers   # ChannelRefs on layers whose *input* channels are the group's
                          #   (kernel axis -2 of Conv/Separable/Dense, axis -1 of ConvTranspose)
        group.activations # ChannelRefs on activation layers (ReLU, Activation, ...) whose output
                          #   carries the group's channels: feature maps for activation criteria

    ChannelRef(layer, layer_class, map, positions, indices)
        layer      # layer path: its name, or "outer_model/inner_layer" inside nested models
        map        # "out" (output channels), "in" / "in1" ... (input k), or a handler's extra map
        positions  # int array: channel positions on that layer's tensor (last axis)
        indices    # int array, same length: group channel index (0 .. size-1) of each position

Several producers in one group mean coupled channels (residual ``Add``, SE ``Multiply``):
channel ``i`` of the group is removed from all of them together. ``indices`` may repeat a
value (DepthwiseConv with ``depth_multiplier > 1``, ``Flatten -> Dense``: one channel spans
several positions) and need not be contiguous (option-A shortcut: the narrow stage maps to the
middle of the wide stage's channels). Scores are per group channel: aggregate per-position
values with ``np.add.at(score, ref.indices, values[ref.positions])``.

``graph.get_layer(path)`` returns the layer object of a path. Keep decisions are expressed as
``{group_id: kept group channel indices}`` (see ``plan.py``); ``graph.keep_mask(keep)`` turns
that into a mask over all channels that ``clone.prune`` consumes.

How it works: every channel position of every tensor is an *atom*; layers create atoms
(producers, inputs, zero padding) or pass them on (BN, ReLU, pooling, Concatenate) and
elementwise merges unite atoms position-wise (union-find). A group channel is one united
atom class; a group is the set of classes reached from one producer's output.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from mskd_tf.errors import MskdError
from mskd_tf.pruning import layers as layer_handlers
from mskd_tf.pruning.channel_map import ChannelMap


@dataclasses.dataclass(frozen=True)
class ChannelRef:
    """Where a group's channels sit on one layer: ``positions`` carry group ``indices``."""

    layer: str
    layer_class: str
    map: str
    positions: np.ndarray
    indices: np.ndarray


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are pruned together (see the module docstring)."""

    id: str
    size: int
    prunable: bool
    reason: str
    offset: int  # first global channel id of the group (graph-internal numbering)
    producers: tuple = ()
    channelwise: tuple = ()
    consumers: tuple = ()
    activations: tuple = ()

    @property
    def batchnorms(self):
        return tuple(r for r in self.channelwise if r.layer_class == "BatchNormalization")

    @property
    def layers(self):
        """Paths of every layer touching the group, in first-seen order."""
        refs = (*self.producers, *self.channelwise, *self.consumers, *self.activations)
        return list(dict.fromkeys(r.layer for r in refs))


@dataclasses.dataclass
class LayerRecord:
    """One layer of the walked model: its handler and the channel maps of its first call."""

    path: str
    layer: object
    handler: object
    maps: dict  # name -> ChannelMap ("in", "in1", ..., "out", "out1", ..., handler extras)
    in_shapes: list
    out_shapes: list


class KeptChannels:
    """Kept positions of every channel map of one layer, for a handler's ``configure``."""

    def __init__(self, graph, record, mask):
        self.record = record
        self.maps = record.maps
        self._graph, self._mask = graph, mask

    def positions(self, name="out"):
        return np.flatnonzero(self._mask[self._graph.channel_of_atom[self.maps[name].atoms]])

    def count(self, name="out"):
        return int(np.count_nonzero(self._mask[self._graph.channel_of_atom[self.maps[name].atoms]]))

    def size(self, name="out"):
        return len(self.maps[name].atoms)

    def axis(self, name="out"):
        return self.maps[name].axis


class _UnionFind:
    def __init__(self):
        self.parent = []

    def add(self, n):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a):
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the older atom stays the root


class BuildContext:
    """What a layer handler's ``propagate`` may do: create, unite and fix atoms."""

    def __init__(self):
        self._atoms = _UnionFind()
        self.atom_source = []  # atom -> source index
        self.sources = []  # (kind, layer path) per new_atoms call
        self.fixed = {}  # atom -> reason its channel may not be pruned
        self._cache = {}  # (path, k) -> atoms, so shared layers reuse their filters
        self._requests = 0
        self.path = ""
        self.layer = None
        self.in_shapes = []
        self.out_shapes = []
        self.extra_maps = {}

    def _begin(self, path, layer, in_shapes, out_shapes):
        self.path, self.layer = path, layer
        self.in_shapes, self.out_shapes = in_shapes, out_shapes
        self._requests = 0
        self.extra_maps = {}

    def new_atoms(self, n, kind="producer", fixed=None):
        """``n`` fresh channels created by the current layer (cached across shared calls)."""
        key = (self.path, self._requests, kind)
        self._requests += 1
        if kind == "producer" and key in self._cache:
            return self._cache[key]
        atoms = self._atoms.add(int(n))
        self.atom_source.extend([len(self.sources)] * int(n))
        self.sources.append((kind, self.path))
        if fixed:
            self.fix(atoms, fixed)
        self._cache[key] = atoms
        return atoms

    def unite(self, a, b):
        """Couple channels position-wise: ``a[i]`` and ``b[i]`` are removed together."""
        if len(a) != len(b):
            raise MskdError(
                f"layer {self.path!r} ({type(self.layer).__name__}) combines {len(a)} and {len(b)} "
                "channels position-wise; their channel counts must match."
            )
        for x, y in zip(a.tolist(), b.tolist()):
            self._atoms.union(x, y)

    def fix(self, atoms, reason):
        """Mark channels as not prunable (their whole group becomes not prunable)."""
        for a in atoms.tolist():
            self.fixed.setdefault(a, reason)

    def set_map(self, name, atoms, axis=-1):
        """Record an extra channel map of the current layer (e.g. a grouped conv's kernel-in)."""
        self.extra_maps[name] = ChannelMap(np.asarray(atoms), axis)

    def roots(self):
        find = self._atoms.find
        return np.array([find(a) for a in range(len(self._atoms.parent))], dtype=np.int64)


def functional_of(operation):
    """The Functional graph behind a functional model or a built Sequential, else None."""
    if isinstance(operation, keras.Model):
        if hasattr(operation, "_nodes_by_depth"):
            return operation
        functional = getattr(operation, "_functional", None)
        if functional is not None:
            return functional
    return None


def require_layer_graph(model):
    """The model's functional graph, or the MskdError that says why a model without one cannot be pruned."""
    functional = functional_of(model)
    if functional is None or not isinstance(model, keras.Model):
        kind = type(model).__name__
        raise MskdError(
            f"model {getattr(model, 'name', model)!r} ({kind}) is not a functional or Sequential Keras "
            "model: a subclassed model's call() is Python code with no layer graph to analyse. "
            "Rebuild it with keras.Model(inputs, outputs) or keras.Sequential (build it with an input shape)."
        )
    return functional


class DependencyGraph:
    """Channel groups of a model plus the per-layer channel maps the clone builder needs."""

    def __init__(self, model, records, tensor_maps, groups, channel_of_atom, num_channels):
        self.model = model
        self.records = records  # path -> LayerRecord, topological order
        self.tensor_maps = tensor_maps  # id(KerasTensor) -> ChannelMap
        self.groups = groups
        self._by_id = {g.id: g for g in groups}
        self.channel_of_atom = channel_of_atom  # atom -> global channel id
        self.num_channels = num_channels

    def group(self, group_id):
        try:
            return self._by_id[group_id]
        except KeyError:
            raise MskdError(f"no channel group {group_id!r}; groups are {list(self._by_id)[:10]}...") from None

    def get_layer(self, path):
        """Layer object of a layer path (``"name"`` or ``"outer/inner"``)."""
        return self.records[path].layer

    def keep_mask(self, keep=None):
        """Boolean mask over all channels from ``{group_id: kept indices}`` (absent = keep all)."""
        mask = np.ones(self.num_channels, dtype=bool)
        for group_id, kept in (keep or {}).items():
            group = self.group(group_id)
            kept = np.asarray(kept, dtype=np.int64)
            if kept.size and (kept.min() < 0 or kept.max() >= group.size):
                raise MskdError(f"keep[{group_id!r}] has indices outside 0..{group.size - 1}.")
            if not group.prunable and len(np.unique(kept)) != group.size:
                raise MskdError(f"group {group_id!r} is not prunable ({group.reason}); keep all its channels.")
            mask[group.offset : group.offset + group.size] = False
            mask[group.offset + kept] = True
        return mask

    def channels(self, path, map_name="out"):
        """Global channel id of every position of a layer's channel map."""
        return self.channel_of_atom[self.records[path].maps[map_name].atoms]

    def kept_positions(self, path, map_name, mask):
        """Positions of a layer's channel map that survive under ``mask``."""
        return np.flatnonzero(mask[self.channels(path, map_name)])

    def __repr__(self):
        prunable = sum(g.prunable for g in self.groups)
        return f"<DependencyGraph {len(self.records)} layers, {len(self.groups)} groups ({prunable} prunable)>"


def build_graph(model, skip=(), handlers=None):
    """Build the channel dependency graph of a functional (or Sequential) Keras model.

    Args:
        model: a built Keras 3 functional model or ``keras.Sequential``; nested functional
            models are walked.
        skip: layer names (or ``"outer/inner"`` paths) to treat as opaque: their input and
            output channels are kept, their weights copied. Use it for custom layers or
            ``Lambda`` layers that have no handler.
        handlers: optional ``{layer class: LayerHandler}`` overriding the registry.

    Returns:
        :class:`DependencyGraph`.

    Raises:
        MskdError: subclassed model, or a layer type with no handler (not in ``skip``).
    """
    functional = require_layer_graph(model)
    ctx = BuildContext()
    tensor_maps = {}
    records = {}
    skip = set(skip)
    for tensor in functional.inputs:
        atoms = ctx.new_atoms(_channels(tensor), kind="input", fixed="model input")
        tensor_maps[id(tensor)] = ChannelMap(atoms)
    _walk(functional, "", ctx, tensor_maps, records, skip, handlers or {}, layer_handlers)
    for tensor in functional.outputs:
        ctx.fix(tensor_maps[id(tensor)].atoms, "model output")
    unknown_skips = skip - set(records)
    if unknown_skips:
        raise MskdError(f"skip names {sorted(unknown_skips)} are not layers of model {model.name!r}.")
    groups, channel_of_atom, num_channels = _make_groups(ctx, records)
    return DependencyGraph(model, records, tensor_maps, groups, channel_of_atom, num_channels)


def _channels(tensor):
    shape = tuple(tensor.shape)
    if len(shape) < 2 or shape[-1] is None:
        raise MskdError(f"tensor {tensor.name!r} of shape {shape} has no known channel axis; build the model "
                        "with a fixed channel count.")
    return int(shape[-1])


def _walk(functional, prefix, ctx, tensor_maps, records, skip, overrides, registry):
    for depth in sorted(functional._nodes_by_depth, reverse=True):  # inputs first
        for node in functional._nodes_by_depth[depth]:
            operation = node.operation
            if node.is_input or isinstance(operation, keras.layers.InputLayer):
                continue
            in_maps = [tensor_maps[id(t)] for t in node.input_tensors]
            inner = functional_of(operation)
            path = prefix + operation.name
            if inner is not None and path not in skip:
                for tensor, channel_map in zip(inner.inputs, in_maps):
                    tensor_maps[id(tensor)] = channel_map
                _walk(inner, path + "/", ctx, tensor_maps, records, skip, overrides, registry)
                out_maps = [tensor_maps[id(t)] for t in inner.outputs]
            else:
                handler = registry.SKIP if path in skip else registry.handler_for(operation, path, overrides)
                in_shapes = [tuple(t.shape) for t in node.input_tensors]
                out_shapes = [tuple(t.shape) for t in node.outputs]
                ctx._begin(path, operation, in_shapes, out_shapes)
                out_maps = handler.propagate(operation, in_maps, ctx)
                maps = {_map_name("in", i): m for i, m in enumerate(in_maps)}
                maps.update({_map_name("out", i): m for i, m in enumerate(out_maps)})
                maps.update(ctx.extra_maps)
                previous = records.get(path)
                if previous is None:
                    records[path] = LayerRecord(path, operation, handler, maps, in_shapes, out_shapes)
                elif getattr(operation, "weights", None):
                    # A shared layer has one set of weights: every call must keep the same channels.
                    for name, channel_map in maps.items():
                        ctx.unite(previous.maps[name].atoms, channel_map.atoms)
            if len(out_maps) != len(node.outputs):
                raise MskdError(f"layer {path!r}: handler returned {len(out_maps)} channel maps for "
                                f"{len(node.outputs)} outputs.")
            for tensor, channel_map in zip(node.outputs, out_maps):
                tensor_maps[id(tensor)] = channel_map


def _map_name(base, i):
    return base if i == 0 else f"{base}{i}"


_ROLE_MAPS = {"producer": ("producers", "out"), "channelwise": ("channelwise", "out"),
              "activation": ("activations", "out")}


def _make_groups(ctx, records):
    roots = ctx.roots()
    n_atoms = len(roots)
    source = np.asarray(ctx.atom_source, dtype=np.int64)
    # Sources (one new_atoms call each) joined by any united atom form one group.
    sources = _UnionFind()
    sources.add(len(ctx.sources))
    for a in np.flatnonzero(roots != np.arange(n_atoms)).tolist():
        sources.union(int(source[a]), int(source[roots[a]]))
    component = np.array([sources.find(s) for s in range(len(ctx.sources))], dtype=np.int64)

    # Producer sources first, largest first, so the widest producer reads 0..size-1 in order.
    atoms_of_source = {}
    for a, s in enumerate(source.tolist()):
        atoms_of_source.setdefault(s, []).append(a)
    by_component = {}
    for s, (kind, path) in enumerate(ctx.sources):
        by_component.setdefault(int(component[s]), []).append(s)

    fixed_root = {}
    for a, reason in ctx.fixed.items():
        fixed_root.setdefault(int(roots[a]), reason)

    channel_of_root = np.full(n_atoms, -1, dtype=np.int64)
    next_channel = 0

    def number_channels(sources):
        """Give every not-yet-numbered atom class of ``sources`` the next channel number."""
        nonlocal next_channel
        for s in sources:
            for a in atoms_of_source[s]:
                r = roots[a]
                if channel_of_root[r] < 0:
                    channel_of_root[r] = next_channel
                    next_channel += 1

    groups = []
    ungrouped = []
    for comp, members in sorted(by_component.items(), key=lambda kv: min(kv[1])):
        producers = [s for s in members if ctx.sources[s][0] == "producer"]
        if not producers:
            ungrouped.append(members)
            continue
        ordered = sorted(producers, key=lambda s: (-len(atoms_of_source[s]), s)) + \
            [s for s in members if s not in producers]
        offset = next_channel
        number_channels(ordered)
        reasons = {fixed_root[r] for s in members for r in roots[atoms_of_source[s]].tolist() if r in fixed_root}
        reasons |= {"skipped layer " + ctx.sources[s][1] for s in members if ctx.sources[s][0] == "fixed"}
        groups.append(ChannelGroup(
            id=ctx.sources[min(producers)][1], size=next_channel - offset, prunable=not reasons,
            reason=", ".join(sorted(reasons)), offset=offset))
    for members in ungrouped:  # inputs, zero pads, skipped layers: always kept
        number_channels(members)
    channel_of_atom = channel_of_root[roots]
    group_of_channel = np.full(next_channel, -1, dtype=np.int64)
    for i, group in enumerate(groups):
        group_of_channel[group.offset : group.offset + group.size] = i
    _attach_refs(groups, records, channel_of_atom, group_of_channel)
    return groups, channel_of_atom, next_channel


def _attach_refs(groups, records, channel_of_atom, group_of_channel):
    refs = {id(g): {"producers": [], "channelwise": [], "consumers": [], "activations": []} for g in groups}

    def add(role, record, map_name):
        channel_map = record.maps.get(map_name)
        if channel_map is None:
            return
        channels = channel_of_atom[channel_map.atoms]
        owners = group_of_channel[channels]
        for g in np.unique(owners[owners >= 0]).tolist():
            group = groups[g]
            positions = np.flatnonzero(owners == g)
            refs[id(group)][role].append(ChannelRef(
                layer=record.path, layer_class=type(record.layer).__name__, map=map_name,
                positions=positions, indices=channels[positions] - group.offset))

    for record in records.values():
        kind = record.handler.role(record.layer)
        if kind in _ROLE_MAPS:
            role, map_name = _ROLE_MAPS[kind]
            add(role, record, map_name)
        for map_name in record.handler.consumed_maps(record.layer):
            add("consumers", record, map_name)
    for group in groups:
        for role, items in refs[id(group)].items():
            setattr(group, role, tuple(items))
