"""The rankings file (``rankings.json``): every criterion's scores per channel group, readable against the model."""

from __future__ import annotations

import json

import numpy as np

from mskd_tf.errors import MskdError
from mskd_tf.workdir import write_atomic

RANKINGS_FORMAT = 1


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
