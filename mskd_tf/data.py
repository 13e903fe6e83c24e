"""Dataset sources -> checked arrays -> train / validation / test ``tf.data`` pipelines.

A *source* string names where the images come from (``fashion_mnist``, ``folder:PATH``, ``tfds:NAME``,
``npz:FILE``; :mod:`mskd_tf.data_sources` reads them); :func:`check_splits` checks every split the same way,
whichever source or API argument it came from.

Conventions every stage relies on: images reach the model as float32 scaled to
[0, 1]; per-channel normalisation (mean/std measured on the training split, in
:class:`DatasetInfo`) belongs *inside* the model as a ``Normalization`` layer so
the deployed TFLite file needs only the /255 scaling. Validation is carved from
the training split with a fixed seed, never from test.

Augmentation (pad-4 random crop + horizontal flip) runs on whole batches, after
``batch()``: one vectorised gather per batch instead of a per-image ``map``.
Its randomness comes from a seeded ``Dataset.random`` stream that is re-drawn
each epoch, so runs are reproducible and epochs differ.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

from mskd_tf import data_sources
from mskd_tf.errors import MskdError

PAD = 4  # pixels of zero padding before the random crop (the CIFAR standard)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale, training split only
    std: tuple[float, ...]
    num_train: int
    num_val: int
    num_test: int


@dataclasses.dataclass
class Arrays:
    """Decoded images (NHWC, uint8 or float in [0, 1]) and int labels of one split."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self):
        return len(self.y)


@dataclasses.dataclass
class Splits:
    """Batched pipelines plus the arrays behind them (for calibration and export)."""

    train: tf.data.Dataset  # shuffled, augmented when asked
    val: tf.data.Dataset | None
    test: tf.data.Dataset
    info: DatasetInfo
    arrays: dict[str, Arrays]


def fingerprint(arrays: dict[str, Arrays]) -> str:
    """A digest of every split's images and labels (a fraction of a second for CIFAR-10): what a work dir's stages
    were computed on, so a resumed run can tell when the same flags now read different images."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for split in sorted(arrays):
        for values in (arrays[split].x, arrays[split].y):
            digest.update(f"{split}:{values.dtype}:{values.shape}".encode())
            digest.update(np.ascontiguousarray(values).data)
    return digest.hexdigest()


def load_arrays(source: str, *, data_dir: str | None = None, download: bool = False):
    """Decode a source (:func:`mskd_tf.data_sources.read`) into checked ``(x_train, y_train, x_test, y_test,
    class_names)`` numpy arrays."""
    x_train, y_train, x_test, y_test, classes = data_sources.read(source, data_dir=data_dir, download=download)
    checked = check_splits({"train": (x_train, y_train), "test": (x_test, y_test)}, where=f"dataset {source}",
                           num_classes=None if classes is None else len(classes),
                           classes_from=None if classes is None else f"its {len(classes)} classes", unit_range=True)
    if classes is None:
        classes = tuple(str(i) for i in range(int(checked["train"].y.max()) + 1))
    return checked["train"].x, checked["train"].y, checked["test"].x, checked["test"].y, tuple(classes)


# ----------------------------------------------------------------------------- validation


def _listing(values, limit: int = 6) -> str:
    """``1, 2, 3 and 4 more``: values for an error message, never a wall of numbers."""
    values = [v.item() if hasattr(v, "item") else v for v in values]
    text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return text + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _check_images(split: str, x, where: str, unit_range: bool) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or 0 in x.shape[1:]:
        raise MskdError(f"{where}{split} images have shape {x.shape}; expected (N, H, W, C) or (N, H, W).")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
        raise MskdError(f"{where}{split} images have dtype {x.dtype}; expected uint8 pixels or float values.")
    if x.dtype == np.uint8:
        return x
    if unit_range and (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        # Integer pixels of a wider type: the pipelines scale only uint8 by 1/255, so narrow them losslessly.
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise MskdError(f"{where}integer {split} images must be pixels in [0, 255]; found {low}..{high}.")
        return x.astype(np.uint8)
    x = x.astype(np.float32)  # what the model sees (a float64 1e300 becomes inf here)
    finite = np.isfinite(x)
    if not finite.all():
        raise MskdError(f"{where}{split} images hold {int(x.size - finite.sum())} NaN or infinite values (as float32); "
                        "clean or drop those images.")
    if unit_range and (x.min() < 0 or x.max() > 1):
        raise MskdError(f"{where}float {split} images must be scaled to [0, 1]; found {x.min():g}..{x.max():g}. "
                        "Divide 0..255 pixels by 255 (or store them as uint8).")
    return x


def _check_labels(split: str, y, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise MskdError(f"{where}{split} labels have shape {y.shape}; expected one integer class index per image, "
                        "shape (N,) (not one-hot rows).")
    if y.dtype == bool or np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.floating):
        raise MskdError(f"{where}{split} labels have dtype {y.dtype}; expected integer class indices.")
    whole = np.isfinite(y) & (y == np.round(y))
    if not whole.all():
        raise MskdError(f"{where}{split} labels must be integer class indices; found {_listing(np.unique(y[~whole]))} "
                        "(not truncated silently: map them to 0..K-1 yourself).")
    if np.abs(y).max() > np.iinfo(np.int64).max / 2:
        raise MskdError(f"{where}{split} labels must be class indices; found {y.max():g}.")
    return y.astype(np.int64)


def check_splits(splits: dict, *, where: str = "", num_classes: int | None = None, classes_from: str | None = None,
                 image_shape=None, shape_from: str = "the model", unit_range: bool = False) -> dict:
    """Validate every split's images and labels before anything trains; the API and the CLI both use it.

    ``splits`` maps a split name (train first) to ``(images, labels)``. Checks, each an
    :class:`MskdError` naming the split and the value: images and labels match in number and are
    not empty; images are a numeric (N, H, W, C) array ((N, H, W) gets a channel axis), finite,
    and with ``unit_range`` uint8 or float in [0, 1] (the ``--dataset`` convention); labels are
    whole numbers (0.5 is an error, 1.0 is class 1); every split's images have the training
    split's shape, and ``image_shape`` (the model's input; ``None`` dims match anything).
    Labels lie in ``[0, num_classes)`` (``classes_from`` says where that count comes from);
    without ``num_classes`` the classes are inferred from the training labels, which must then
    be 0..K-1 without a gap, and no other split may hold a label training never saw.

    Returns ``{split: Arrays}``: uint8 or float32 images, int64 labels.
    """
    where = f"{where}: " if where else ""
    checked = {}
    for split, (x, y) in splits.items():
        try:
            x, y = np.asarray(x), np.asarray(y)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise MskdError(f"{where}{split} images and labels must be arrays ({exc}).") from None
        if y.ndim == 0 or x.ndim == 0 or len(x) != len(y) or len(x) == 0:
            raise MskdError(f"{where}{split} split has {len(x) if x.ndim else 0} images and {len(y) if y.ndim else 0} "
                            "labels; they must match and be > 0.")
        checked[split] = Arrays(_check_images(split, x, where, unit_range), _check_labels(split, y, where))
    first, reference = next(iter(checked)), None
    for split, arrays in checked.items():
        shape = tuple(int(d) for d in arrays.x.shape[1:])
        if reference is None:
            reference = shape
        elif shape != reference:
            raise MskdError(f"{where}{split} images have shape {shape}, but the {first} images have shape {reference}; "
                            "every split must have one image shape.")
        if image_shape is not None:
            expected = tuple(image_shape)
            if len(expected) != len(shape) or any(e is not None and int(e) != s for e, s in zip(expected, shape)):
                raise MskdError(f"{where}{split} images have shape {shape}, but {shape_from} takes inputs of shape "
                                f"{expected}.")
    for split, arrays in checked.items():
        low = int(arrays.y.min())
        if low < 0:
            raise MskdError(f"{where}{split} labels must be class indices >= 0; found {_listing(np.unique(arrays.y[arrays.y < 0]))}.")
        if num_classes is not None:
            outside = np.unique(arrays.y[arrays.y >= num_classes])
            if len(outside):
                raise MskdError(f"{where}{split} label {_listing(outside)} is outside [0, {num_classes}) "
                                f"({classes_from or f'{num_classes} classes'}).")
    if num_classes is None:
        seen = np.unique(checked[first].y)
        count = int(seen[-1]) + 1
        if len(seen) != count:
            missing = count - len(seen)
            raise MskdError(
                f"{where}{first} labels are {_listing(seen)}: label {seen[-1]} would make a model of {count} classes, "
                f"{missing} of which never occur{'' if missing > 1 else 's'}; number the classes 0..{len(seen) - 1} "
                "without gaps (or fix the stray label).")
        if count < 2:
            raise MskdError(f"{where}{first} labels are all {int(seen[0])}: a classifier needs at least 2 classes in its "
                            "training data.")
        for split, arrays in checked.items():
            unseen = np.setdiff1d(np.unique(arrays.y), seen)
            if len(unseen):
                raise MskdError(f"{where}{split} label {_listing(unseen)} never occurs in the {first} split (labels "
                                f"0..{count - 1}); the model could never predict it.")
    return checked


# ----------------------------------------------------------------------------- pipelines


def to_unit(images):
    """uint8 -> float32 in [0, 1]; float input is taken as already scaled."""
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def augment_batch(images, seed):
    """Pad-4 random crop + random horizontal flip for a whole batch, stateless.

    ``seed`` is a shape-[2] int tensor; the same seed gives the same batch.
    Each image gets its own crop offset and flip (a gather per batch, no per-image map).
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    offsets = tf.random.stateless_uniform([batch, 2], seed, 0, 2 * PAD + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    flip = tf.random.stateless_uniform([batch], seed + 1, 0, 2, dtype=tf.int32) > 0
    # A flip is a reversed column index list: fold it into the same gather.
    cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def _options():
    options = without_autotuning()
    options.deterministic = True
    # Input work must not pre-empt the training step on 2 cores: keep it on one thread.
    options.threading.max_intra_op_parallelism = 1
    return options


def without_autotuning():
    """Options that turn tf.data's autotuning off, for the library's pipelines and the datasets a user passes in.

    With it every pass over a pipeline ended late, waiting for the tuning thread (0.2-0.4 s, up to 5 s:
    docs/benchmarks/quiet_machine_2026-12-03.md, "The bimodal TF blocks"). The library runs many short passes
    (selection rungs, BatchNorm re-estimation, scores), and batches are made ~100x faster than trained on: a
    fixed prefetch is enough.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


PREFETCH_BATCHES = 2  # see _options: one batch in the step, one ready


@contextlib.contextmanager
def _global_seed(seed: int):
    """TF's global seed set to ``seed`` while datasets are built, and given back after.

    A dataset's random ops take their seeds from the op seed *and* the global seed in force when the dataset is
    built, so ``train_pipeline(seed=1)`` gave another order after ``tf.random.set_seed(0)`` than in a fresh
    process (MS-KD's selection at seed 1 chose another candidate for that reason). Pinning it makes the order a
    function of ``seed`` alone: the one any caller got who had set ``tf.random.set_seed(seed)`` first.
    """
    from tensorflow.python.eager import context  # the global seed's current value (no public getter)

    saved = context.global_seed()
    tf.random.set_seed(seed)
    try:
        yield
    finally:
        tf.random.set_seed(saved)


def train_pipeline(arrays: Arrays, batch_size: int, *, augment: bool = True, seed: int = 0,
                   first_epoch: int = 0) -> tf.data.Dataset:
    """Shuffled (re-shuffled per epoch), batched, optionally augmented training batches.

    Pass ``k`` over the dataset is epoch ``first_epoch + k`` of the seed's sequence of orders and
    augmentations, so a run resumed after epoch ``e`` (``first_epoch=e``) trains on the batches an
    uninterrupted run trained on. The arrays already sit in memory, so there is nothing to ``cache()``:
    each batch is a gather of shuffled indices from one in-memory tensor.
    """
    images, labels = tf.constant(arrays.x), tf.constant(arrays.y)
    n = len(arrays)
    with _global_seed(seed):
        ds = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
        ds = ds.map(lambda idx: (to_unit(tf.gather(images, idx)), tf.gather(labels, idx)))
        if augment:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip(ds, seeds).map(lambda batch, s: (augment_batch(batch[0], s), batch[1]))
    ds = ds.prefetch(PREFETCH_BATCHES).with_options(_options())
    # Each new iterator draws the next seeds of the reshuffle and re-randomize streams (before reading
    # anything), so creating one per epoch already done moves both streams to epoch ``first_epoch``.
    for _ in range(first_epoch):
        iter(ds)
    return ds


def eval_pipeline(arrays: Arrays, batch_size: int, *, cache: bool = True) -> tf.data.Dataset:
    """Unshuffled, unaugmented batches, cached as float32 after the first pass.

    ``cache=False`` for consumers that only ever ``take`` a few batches (BatchNorm recalibration, criteria,
    int8 calibration): a cache that is never read to the end is discarded with a TF warning each time.
    """
    ds = tf.data.Dataset.from_tensor_slices((arrays.x, arrays.y)).batch(batch_size)
    ds = ds.map(lambda x, y: (to_unit(x), y))
    return (ds.cache() if cache else ds).prefetch(PREFETCH_BATCHES).with_options(_options())


def split_validation(x, y, val_fraction: float, seed: int):
    """Carve a seeded random validation split from the training arrays."""
    if not 0 <= val_fraction < 1:
        raise MskdError(f"val_fraction={val_fraction} must be in [0, 1).")
    order = np.random.default_rng(seed).permutation(len(y))
    num_val = int(round(val_fraction * len(y)))
    return Arrays(x[order[num_val:]], y[order[num_val:]]), Arrays(x[order[:num_val]], y[order[:num_val]])


def channel_stats(x: np.ndarray, chunk: int = 4096):
    """Per-channel mean and std on the [0, 1] scale, in chunks (no full float copy)."""
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    total = np.zeros(x.shape[-1])
    total_sq = np.zeros(x.shape[-1])
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].astype(np.float64) / scale
        total += part.sum(axis=(0, 1, 2))
        total_sq += (part**2).sum(axis=(0, 1, 2))
    count = len(x) * x.shape[1] * x.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def load(
    source: str,
    *,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    val_fraction: float = 0.1,
    augment: bool = True,
    seed: int = 0,
    train_subset: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> Splits:
    """Turn a source string into train / val / test pipelines and the dataset's metadata.

    >>> splits = load("fashion_mnist", batch_size=128, train_subset=5000)
    >>> splits.info.image_shape, splits.info.num_classes
    ((28, 28, 1), 10)
    """
    if batch_size < 1:
        raise MskdError(f"batch_size={batch_size} must be >= 1.")
    x_train, y_train, x_test, y_test, classes = load_arrays(source, data_dir=data_dir, download=download)
    train, val = split_validation(x_train, y_train, val_fraction, seed)
    if train_subset:
        if train_subset < 1:
            raise MskdError(f"train_subset={train_subset} must be a positive number of images (or 0 for all).")
        train = Arrays(train.x[:train_subset], train.y[:train_subset])
    if len(train) == 0:
        raise MskdError(f"dataset {source}: no training images left after holding out val_fraction={val_fraction:g} "
                        f"of {len(y_train)} for validation; lower val_fraction or add images.")
    test = Arrays(x_test, y_test)
    mean, std = channel_stats(train.x)
    info = DatasetInfo(
        name=source, image_shape=tuple(int(d) for d in train.x.shape[1:]), num_classes=len(classes),
        class_names=tuple(classes), mean=mean, std=std,
        num_train=len(train), num_val=len(val), num_test=len(test),
    )
    eval_batch = eval_batch_size or 2 * batch_size
    return Splits(
        train=train_pipeline(train, batch_size, augment=augment, seed=seed),
        val=eval_pipeline(val, eval_batch) if len(val) else None,
        test=eval_pipeline(test, eval_batch),
        info=info,
        arrays={"train": train, "val": val, "test": test},
    )
