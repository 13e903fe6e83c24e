"""The one type the dependency graph and the layer handlers both speak (kept apart so neither imports the other)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """Atoms (channel identities) along the channel axis of one tensor."""

    atoms: np.ndarray
    axis: int = -1  # where the channels are; only the option-A pad pattern moves them
