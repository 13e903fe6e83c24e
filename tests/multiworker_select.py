"""One worker of a local multi-worker selection (run by tests/test_multiworker.py).

Usage: ``TF_CONFIG=... python multiworker_select.py {sync|parallel|parallel_pooled|distill} WORKDIR``

* ``sync``: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``; both workers
  fine-tune one tiny candidate together.
* ``sync_halving``: the same, with three candidates and successive halving; each worker
  shuffles (as after the chief's own stages) and scales its batches its own way, so their
  BatchNorm-recalibrated scores differ unless the workers agree on the chief's.
* ``distill``: both workers distill one tiny student from a tiny teacher together.
* ``parallel``: candidate-parallel selection; each worker trains its share of
  four tiny candidates locally and the chief chooses.

Prints ``PAYLOAD <json>`` (the payload ``select`` returned) on success. Also
holds the tiny models and data the selection tests share.
"""

import hashlib
import json
import sys

import numpy as np

# Fine-tune every candidate: no capacity pool and no zero-cost rung (the library's defaults have both).
EVERY_CANDIDATE = {"zero_cost_keep": 0, "min_params_ratio": 0.0}

IMAGE = (16, 16, 3)
CLASSES = 4


def tiny_candidate(width: int, name: str, seed: int = 0, batchnorm: bool = True):
    """conv-BN-ReLU -> strided conv -> global pool -> logits: two convs, a few hundred weights."""
    import keras

    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input(IMAGE)
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not batchnorm, name="conv1")(x)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(x), name=name)


def tiny_arrays(n: int = 256, seed: int = 0):
    """Random images whose label is a function of the top-left mean: learnable, deterministic."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *IMAGE), dtype=np.float32)
    brightness = x[:, :8, :8, 0].mean(axis=(1, 2))
    y = np.searchsorted(np.quantile(brightness, [0.25, 0.5, 0.75]), brightness).astype(np.int64)  # balanced
    return x, y


def tiny_datasets(n_train: int = 192, n_val: int = 64, batch: int = 32, seed: int = 0, shuffle: bool = True,
                  shuffle_seed: int | None = None):
    """(train, val): a seeded, reshuffled (when ``shuffle``) training pipeline and an unshuffled validation one."""
    import tensorflow as tf

    x, y = tiny_arrays(n_train + n_val, seed)
    train = tf.data.Dataset.from_tensor_slices((x[:n_train], y[:n_train]))
    if shuffle:
        train = train.shuffle(n_train, seed=seed if shuffle_seed is None else shuffle_seed, reshuffle_each_iteration=True)
    train = train.batch(batch)
    val = tf.data.Dataset.from_tensor_slices((x[n_train:], y[n_train:])).batch(batch)
    return train, val


def main(mode: str, workdir: str):
    from mskd_tf.distribute import make_strategy

    # The collective strategy must exist before TensorFlow runs any op.
    strategy = make_strategy("multi_worker") if mode in ("sync", "sync_halving", "distill") else None
    from mskd_tf.distribute import read_tf_config
    from mskd_tf.selection import select

    train, val = tiny_datasets()
    if mode == "distill":
        from mskd_tf.distill import distill

        # No BatchNorm: its moving statistics are per replica under any Mirrored training
        # (see docs/selection_and_distillation.md).
        student, history = distill(tiny_candidate(8, "teacher", seed=2, batchnorm=False),
                                   tiny_candidate(4, "student", seed=3, batchnorm=False),
                                   train, val, epochs=2, lr=0.05, strategy=strategy, seed=0)
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in student.get_weights()))
        print("PAYLOAD " + json.dumps({"weights": digest.hexdigest(), "history": history}), flush=True)
        return
    if mode == "sync_halving":
        worker = int(read_tf_config()["task"]["index"])
        train, val = tiny_datasets(shuffle_seed=worker)
        train = train.map(lambda x, y: (x * (1 + 2 * worker), y))  # and its own brightness: scores surely differ
        candidates = {f"w{w}": tiny_candidate(w, f"w{w}", seed=w) for w in (4, 6, 8)}
        payload = select(candidates, train, val, workdir=workdir, epochs=1.0, lr=0.05, strategy=strategy,
                         bn_recalibration_batches=2, **EVERY_CANDIDATE, verbose=False)
    elif mode == "sync":
        candidates = {"tiny": tiny_candidate(8, "tiny", seed=1)}
        payload = select(candidates, train, val, workdir=workdir, epochs=0.5, successive_halving=False,
                         lr=0.05, strategy=strategy, verbose=False)
    else:
        candidates = {f"w{w}": tiny_candidate(w, f"w{w}", seed=w) for w in (4, 6, 8, 10)}
        # parallel_pooled: the zero-cost rung keeps w4 and w8, the 1st and 3rd of the list
        pools = {"zero_cost_keep": 2, "zero_cost_scores": {"w4": 0.9, "w6": 0.1, "w8": 0.8, "w10": 0.2}}
        payload = select(candidates, train, val, workdir=workdir, epochs=1.0, lr=0.05, parallel=True,
                         wait_timeout=120, verbose=False, **{**EVERY_CANDIDATE, **(pools if mode == "parallel_pooled" else {})})
    print("PAYLOAD " + json.dumps(payload), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
