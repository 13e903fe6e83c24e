"""The Android kit: the model, ``labels.txt`` and the JSON telling the app how to feed it."""

from __future__ import annotations

import json
import os

import numpy as np

from mskd_tf import quantize
from mskd_tf.deploy.templates import copy_templates
from mskd_tf.errors import MskdError
from mskd_tf.workdir import write_atomic


def write_android_kit(
    tflite_bytes: bytes, out_dir: str, *, class_names: list[str] | None = None, kind: str = "int8"
) -> dict:
    """Write ``model.tflite``, ``labels.txt`` and ``model_info.json`` for an Android app into ``out_dir``.

    The JSON holds what the app must do to a camera frame: resize to the input
    shape, scale pixels to [0, 1], and (for int8 models) quantize with the given
    scale and zero point; per-channel mean/std normalisation is inside the model.
    """
    io = quantize.io_details(tflite_bytes)
    num_classes = io["output"]["shape"][-1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise MskdError(
            f"class_names has {len(names)} entries but the model outputs {num_classes} logits; "
            "pass one name per class, in label order."
        )
    inp = io["input"]
    integer_input = inp["dtype"].startswith(("int", "uint"))
    info = {
        "model_file": "model.tflite",
        "variant": kind,
        "input": inp,
        "output": {**io["output"], "meaning": "logits; apply softmax for probabilities"},
        "labels_file": "labels.txt",
        "normalisation": {
            "pixel_range": [0, 255],
            "model_input": "pixel / 255.0 (float in [0, 1]); per-channel mean/std is inside the model",
            "resize_to": inp["shape"][1:3],
            "channels": inp["shape"][3],
            "channel_order": "RGB" if inp["shape"][3] == 3 else "grayscale",
        },
    }
    if integer_input:
        info["normalisation"]["quantize"] = (
            f"q = clamp(round(pixel / 255.0 / {inp['scale']!r}) + {inp['zero_point']}, "
            f"{np.iinfo(inp['dtype']).min}, {np.iinfo(inp['dtype']).max}) as {inp['dtype']}"
        )
        # When scale is 1/255 the whole pre-processing is one integer add; say so.
        if abs(inp["scale"] * 255.0 - 1.0) < 1e-6:
            info["normalisation"]["shortcut"] = f"q = pixel + ({inp['zero_point']})"
    paths = {
        "model": write_atomic(os.path.join(out_dir, "model.tflite"), tflite_bytes),
        "labels": write_atomic(os.path.join(out_dir, "labels.txt"), "\n".join(names) + "\n"),
        "info": write_atomic(os.path.join(out_dir, "model_info.json"), json.dumps(info, indent=2) + "\n"),
    }
    paths.update(copy_templates("android", out_dir))
    return {"paths": paths, "info": info}
