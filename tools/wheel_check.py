"""Checks that an installed wheel (not the checkout) writes complete deployment kits.

Run by `make wheel-check` (and so by CI) with a clean virtual environment's Python, from a folder outside
the checkout: it exports a tiny trained model to int8 with the TFLite Micro and Android kits and fails
unless mskd_tf was imported from that environment and every kit file is there.
"""

import os
import sys
import tempfile
from pathlib import Path

KIT_FILES = {
    "micro": ["README.md", "main.cc", "model_data.cc", "model_data.h", "model_ops.h"],
    "android": ["Classifier.kt", "README.md", "labels.txt", "model.tflite", "model_info.json"],
}


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import mskd_tf
    from mskd_tf import deploy

    where = Path(mskd_tf.__file__).resolve()
    if not str(where).startswith(sys.prefix):
        print(f"wheel-check: mskd_tf was imported from {where}, not from this environment ({sys.prefix})")
        return 1
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int64")
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with tempfile.TemporaryDirectory() as out:
        deploy.export_all(model, out, kinds=("int8",), representative_ds=data, test_ds=data, num_calibration=32,
                          class_names=["dark", "bright"], micro=True, micro_images=8, threads=(1,))
        missing = [f"{kind}/{name}" for kind, names in KIT_FILES.items() for name in names
                   if not (Path(out) / kind / name).is_file()]
        if missing:
            print(f"wheel-check: kit files missing: {', '.join(missing)}")
            return 1
    print(f"wheel-check: ok, mskd_tf {mskd_tf.__version__} from {where.parent} wrote complete micro and android kits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
