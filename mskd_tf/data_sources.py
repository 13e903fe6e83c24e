"""Where images come from: each ``--dataset`` source decoded into numpy arrays (checked by :mod:`mskd_tf.data`).

* ``fashion_mnist``: Debian's copy in ``/usr/share/datasets/fashion-mnist/``
  (``apt-get install dataset-fashion-mnist``), else ``keras.datasets`` (downloads).
* ``folder:PATH``: an image folder ``PATH/train/<class>/*`` + ``PATH/test/<class>/*``,
  or a ``.tar.gz`` of one (extracted once into the cache folder). Decoded once and
  cached as ``.npz`` in ``$MSKD_CACHE`` (default ``~/.cache/mskd_tf``).
* ``tfds:NAME``: ``tensorflow_datasets.load`` (``data_dir`` / ``download`` arguments).
* ``npz:FILE``: arrays ``x_train, y_train, x_test, y_test``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from mskd_tf.errors import MskdError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def read(source: str, *, data_dir: str | None = None, download: bool = False):
    """Decode a source into ``(x_train, y_train, x_test, y_test, class_names or None)``, unchecked."""
    if not isinstance(source, str) or not source:
        raise MskdError(f"dataset={source!r}: give fashion_mnist, folder:DIR, tfds:NAME or npz:FILE.")
    kind, _, arg = source.partition(":")
    if source == "fashion_mnist":
        return _fashion_mnist()
    if kind == "folder" and arg:
        return _folder(arg)
    if kind == "tfds" and arg:
        return _tfds(arg, data_dir, download)
    if kind == "npz" and arg:
        return _npz(arg)
    raise MskdError(f"dataset={source!r} is not understood; give fashion_mnist, folder:DIR, tfds:NAME or npz:FILE.")


def cache_dir() -> Path:
    return Path(os.environ.get("MSKD_CACHE", Path.home() / ".cache" / "mskd_tf"))


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: the format of the MNIST family."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MskdError(f"{path} is not an IDX file; reinstall it with `apt-get install --reinstall dataset-fashion-mnist`.")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist():
    files = {k: FASHION_MNIST_DIR / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if all(p.exists() for p in files.values()):
        x_train, y_train = _read_idx(files["train-images"]), _read_idx(files["train-labels"])
        x_test, y_test = _read_idx(files["t10k-images"]), _read_idx(files["t10k-labels"])
    else:
        import keras

        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
        except Exception as exc:  # no network: say where the offline copy comes from
            raise MskdError(
                f"Fashion-MNIST is not in {FASHION_MNIST_DIR} and could not be downloaded ({exc}). "
                "Install the offline copy with `apt-get install -y dataset-fashion-mnist`."
            ) from exc
    return (x_train[..., None], y_train, x_test[..., None], y_test, FASHION_MNIST_CLASSES)


def _extract_archive(archive: Path) -> Path:
    """Extract a .tar.gz image folder once into the cache; return the folder holding train/ and test/."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"extracted-{archive.name.split('.')[0]}-{key}"
    if not (target / ".complete").exists():
        import shutil
        import tempfile

        # Each process extracts into its own folder and renames it into place: runs started together (two
        # benchmarks on one archive) must not delete each other's half-extracted files.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
        tmp.chmod(0o755)  # a cache folder like any other, not mkdtemp's private one
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MskdError(f"cannot extract {archive}: {exc}. Check the file or pass the extracted folder.") from exc
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:  # another process put its copy there first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / ".complete").exists():
                raise
    for root in (target, *sorted(p for p in target.iterdir() if p.is_dir())):
        if (root / "train").is_dir():
            return root
    raise MskdError(f"{archive} holds no train/ folder; expected train/<class>/* and test/<class>/*.")


def _list_split(root: Path, split: str, class_names=None):
    split_dir = root / split
    if not split_dir.is_dir():
        raise MskdError(f"{split_dir} does not exist; an image folder needs {root}/train/<class>/* and {root}/test/<class>/*.")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise MskdError(f"{split_dir} has no class folders; put images under {split_dir}/<class>/.")
    if class_names is not None and tuple(classes) != tuple(class_names):
        raise MskdError(f"{split_dir} has classes {classes}, but train/ has {list(class_names)}; they must match.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MskdError(f"class folder {split_dir / name} has no images ({', '.join(IMAGE_SUFFIXES)}).")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, np.int64), tuple(classes)


def _decode_files(paths: list[str]) -> np.ndarray:
    """Decode images in parallel with tf.data; name the file when one is corrupt or the wrong size."""
    from PIL import Image

    try:
        with Image.open(paths[0]) as first:
            first.load()
            shape = np.asarray(first).shape
    except Exception as exc:
        raise MskdError(f"cannot decode image {paths[0]}: {exc}. Remove or replace the file.") from exc
    height, width = shape[:2]
    channels = 1 if len(shape) == 2 else shape[2]

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        return tf.ensure_shape(image, (height, width, channels))

    ds = tf.data.Dataset.from_tensor_slices(paths).map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    try:
        return np.concatenate([b.numpy() for b in ds])
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        pass
    # The fast path failed somewhere: find and name the culprit (slow, only on error).
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                got = np.asarray(im).shape
        except Exception as exc:
            raise MskdError(f"cannot decode image {path}: {exc}. Remove or replace the file.") from exc
        if got[:2] != (height, width):
            raise MskdError(
                f"image {path} is {got[1]}x{got[0]} but {paths[0]} is {width}x{height}; "
                "all images of a folder dataset must have one size."
            )
    raise MskdError(f"decoding the images under {Path(paths[0]).parents[2]} failed; check the files.")


def _folder(path_text: str):
    path = Path(path_text).expanduser()
    if not path.exists():
        raise MskdError(f"dataset folder:{path_text}: {path} does not exist. Pass an image folder or its .tar.gz.")
    root = _extract_archive(path) if path.is_file() else path
    train_paths, y_train, classes = _list_split(root, "train")
    test_paths, y_test, _ = _list_split(root, "test", classes)
    listing = "\n".join(train_paths + test_paths).encode()
    key = hashlib.sha1(listing + str(root.resolve()).encode()).hexdigest()[:16]
    cached = cache_dir() / f"folder-{key}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return z["x_train"], y_train, z["x_test"], y_test, classes
    x_train, x_test = _decode_files(train_paths), _decode_files(test_paths)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=x_train, x_test=x_test)
    tmp.rename(cached)
    return x_train, y_train, x_test, y_test, classes


def _tfds(name: str, data_dir: str | None, download: bool):
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise MskdError("tfds sources need tensorflow-datasets (pip install tensorflow-datasets importlib_resources).") from exc
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as exc:
        raise MskdError(f"dataset tfds:{name}: unknown tfds dataset ({exc}).") from exc
    if not download and not builder.is_prepared():
        raise MskdError(
            f"dataset tfds:{name} is not prepared in {builder.data_dir}; pass --download (needs network) "
            "or --data_dir pointing at a folder that holds it."
        )
    try:
        train, test = tfds.load(name, split=["train", "test"], as_supervised=True, batch_size=-1,
                                data_dir=data_dir, download=download)
    except Exception as exc:
        raise MskdError(f"dataset tfds:{name}: loading failed ({exc}).") from exc
    classes = tuple(builder.info.features["label"].names)
    return train[0].numpy(), train[1].numpy(), test[0].numpy(), test[1].numpy(), classes


def _npz(path_text: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise MskdError(f"dataset npz:{path_text}: file {path} does not exist.")
    import zipfile

    if not zipfile.is_zipfile(path):  # np.load takes any other bytes for a pickle and says so
        raise MskdError(f"dataset npz:{path_text}: {path} is not an .npz archive (np.savez writes one, with x_train, "
                        "y_train, x_test, y_test).")
    try:
        z = np.load(path)  # allow_pickle stays off: an object array fails below with its name
    except Exception as exc:
        raise MskdError(f"dataset npz:{path_text}: cannot read {path} as .npz ({exc}).") from exc
    with z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise MskdError(f"{path} lacks arrays {sorted(missing)}; an npz dataset needs x_train, y_train, x_test, y_test (it has {z.files}).")
        try:
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        except ValueError as exc:  # an object (pickled) array: ragged images, or Python objects
            raise MskdError(f"dataset npz:{path_text}: {path} holds an object array ({exc.__class__.__name__}: "
                            "pickled data is not loaded); save numeric arrays of equal-sized images "
                            "(x: N x H x W x C, y: N integers).") from exc
    # No class list is stored: check_splits infers it from the training labels (and checks the test labels).
    return (*arrays, None)
