"""The deployer-facing templates (``main.cc``, ``Classifier.kt``, READMEs) copied into each kit.

They live in the repository's top-level ``export/`` folder and ship inside the wheel as the
package data ``mskd_tf.export_templates`` (setup.py), so an installed mskd_tf writes whole kits.
"""

from __future__ import annotations

import os

from mskd_tf.errors import MskdError
from mskd_tf.workdir import write_atomic

TEMPLATE_PACKAGE = "mskd_tf.export_templates"  # the top-level export/ folder, shipped as package data (setup.py)


def copy_templates(kind: str, out_dir: str) -> dict:
    """Copy the deployer-facing templates of ``export/<kind>/`` (package data) into ``out_dir``."""
    from importlib import resources

    try:
        source = resources.files(TEMPLATE_PACKAGE) / kind
    except ModuleNotFoundError:
        source = None
    if source is None or not source.is_dir():
        raise MskdError(f"the {kind} kit templates ({TEMPLATE_PACKAGE}/{kind}) are missing from this installation of "
                        "mskd_tf; reinstall it (pip install mskd_tf, or pip install -e . in a checkout).")
    copied = {}
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.is_file():
            copied[entry.name] = write_atomic(os.path.join(out_dir, entry.name), entry.read_bytes())
    return copied
