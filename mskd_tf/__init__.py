"""mskd_tf: MS-KD model compression for Keras 3 (prune with several criteria,
select the best sub-network, distill it from the original, ship it as TFLite).

Heavy submodules load lazily so that ``import mskd_tf`` stays cheap and a
missing optional part never breaks the others.
"""

import importlib

__version__ = "0.1.0"

from mskd_tf.errors import MskdError  # noqa: E402  (light, no TF import)

_LAZY = {
    "compress": ("mskd_tf.api", "compress"),
    "CompressionResult": ("mskd_tf.api", "CompressionResult"),
    "Distiller": ("mskd_tf.distill", "Distiller"),
    "Config": ("mskd_tf.config", "Config"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mskd_tf' has no attribute {name!r}")


__all__ = ["MskdError", "__version__", *_LAZY]
