import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mskd_tf import data, data_sources
from mskd_tf.errors import MskdError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSKD_CACHE", str(tmp_path / "cache"))


def _write_folder(root, sizes=(6, 4), shape=(8, 8, 3), seed=0):
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), sizes):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels.squeeze()).save(root / split / cls / f"{i}.png")
    return root


def _crop_and_flip_of(original, augmented):
    """Return (dy, dx, flipped) such that augmented is that crop of the zero-padded original."""
    padded = np.pad(original, ((data.PAD, data.PAD), (data.PAD, data.PAD), (0, 0)))
    h, w = original.shape[:2]
    for dy in range(2 * data.PAD + 1):
        for dx in range(2 * data.PAD + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            if np.allclose(crop, augmented):
                return dy, dx, False
            if np.allclose(crop[:, ::-1], augmented):
                return dy, dx, True
    return None


def test_augment_batch_is_per_image_crop_and_flip_and_seeded():
    rng = np.random.default_rng(1)
    images = rng.random((400, 12, 12, 2)).astype(np.float32) + 0.1  # no zeros: padding is visible
    out = data.augment_batch(tf.constant(images), tf.constant([3, 7], tf.int64)).numpy()
    found = [_crop_and_flip_of(images[i], out[i]) for i in range(len(images))]
    assert all(f is not None for f in found), "every output must be a pad-4 crop (maybe flipped) of its input"
    offsets = {(dy, dx) for dy, dx, _ in found}
    assert len(offsets) > 40  # 81 possible offsets: crops differ per image
    flip_share = np.mean([f for _, _, f in found])
    assert 0.4 < flip_share < 0.6
    again = data.augment_batch(tf.constant(images), tf.constant([3, 7], tf.int64)).numpy()
    np.testing.assert_array_equal(out, again)
    other = data.augment_batch(tf.constant(images), tf.constant([4, 7], tf.int64)).numpy()
    assert not np.array_equal(out, other)


def test_train_pipeline_differs_per_epoch_and_repeats_under_seed():
    x = (np.arange(64 * 8 * 8) % 251).astype(np.uint8).reshape(64, 8, 8, 1) + 1
    arrays = data.Arrays(x, np.arange(64) % 3)
    epoch = lambda ds: [b[0].numpy() for b in ds]  # noqa: E731
    ds = data.train_pipeline(arrays, 16, augment=True, seed=5)
    first, second = epoch(ds), epoch(ds)
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    replay = data.train_pipeline(arrays, 16, augment=True, seed=5)
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(epoch(replay)))
    labels = np.concatenate([b[1].numpy() for b in ds])
    assert sorted(labels.tolist()) == sorted(arrays.y.tolist())  # every image once per epoch
    assert np.concatenate(first).max() <= 1.0


def test_train_pipeline_from_a_later_epoch_continues_the_seeds_sequence():
    """A run resumed after epoch 2 builds its pipeline with first_epoch=2: its passes are epochs 2 and 3 of an
    uninterrupted run's pipeline (order and augmentation), not epochs 0 and 1 again."""
    x = (np.arange(48 * 6 * 6) % 251).astype(np.uint8).reshape(48, 6, 6, 1) + 1
    arrays = data.Arrays(x, np.arange(48) % 5)
    epoch = lambda ds: np.concatenate([b[0].numpy() for b in ds])  # noqa: E731
    whole = data.train_pipeline(arrays, 16, augment=True, seed=4)
    epochs = [epoch(whole) for _ in range(4)]
    resumed = data.train_pipeline(arrays, 16, augment=True, seed=4, first_epoch=2)
    np.testing.assert_array_equal(epoch(resumed), epochs[2])
    np.testing.assert_array_equal(epoch(resumed), epochs[3])
    assert not np.array_equal(epochs[2], epochs[0])


def test_train_pipeline_order_depends_on_its_seed_only():
    """TF seeds dataset ops from the global seed too: the pipeline must give the same batches whatever the caller
    set before (it gave other orders after tf.random.set_seed(0) than in a fresh process), namely the ones a caller
    got who had set tf.random.set_seed(seed); and it must give the caller's global seed back."""
    import tensorflow as tf
    from tensorflow.python.eager import context

    x = (np.arange(64 * 4 * 4) % 251).astype(np.uint8).reshape(64, 4, 4, 1)
    arrays = data.Arrays(x, np.arange(64) % 7)
    batches = lambda ds: np.concatenate([b[0].numpy() for b in ds])  # noqa: E731
    tf.random.set_seed(1)
    reference = batches(data.train_pipeline(arrays, 16, augment=True, seed=1))
    for caller_seed in (None, 0, 5):
        tf.random.set_seed(caller_seed)
        np.testing.assert_array_equal(batches(data.train_pipeline(arrays, 16, augment=True, seed=1)), reference)
        assert context.global_seed() == caller_seed
    assert not np.array_equal(batches(data.train_pipeline(arrays, 16, augment=True, seed=2)), reference)


def test_pipelines_run_without_tf_data_autotuning():
    """Autotuning made every pass end 0.2-0.4 s late (BENCHMARKS.md, issue 14): the library's pipelines turn it
    off and keep their one-thread, deterministic input."""
    arrays = data.Arrays(np.zeros((8, 4, 4, 1), np.uint8), np.arange(8) % 2)
    for ds in (data.train_pipeline(arrays, 4, augment=True, seed=0), data.eval_pipeline(arrays, 4)):
        options = ds.options()
        assert options.autotune.enabled is False
        assert options.deterministic is True and options.threading.max_intra_op_parallelism == 1
        assert sum(b[0].shape[0] for b in ds) == 8


def test_folder_source_loads_splits_and_stats(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    splits = data.load(f"folder:{root}", batch_size=4, val_fraction=0.25, augment=False, seed=0)
    info = splits.info
    assert info.class_names == ("cat", "dog") and info.image_shape == (8, 8, 3)
    assert (info.num_train, info.num_val, info.num_test) == (9, 3, 8)
    x_train = splits.arrays["train"].x.astype(np.float64) / 255
    np.testing.assert_allclose(info.mean, x_train.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(info.std, x_train.std(axis=(0, 1, 2)), rtol=1e-5)
    batches = list(splits.test)
    assert sum(len(b[1]) for b in batches) == 8 and batches[0][0].dtype == tf.float32


def test_an_archive_extracted_by_two_runs_at_once_serves_both(tmp_path, monkeypatch):
    import tarfile
    import threading

    root = _write_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    both_extracting = threading.Barrier(2, timeout=30)
    extractall = tarfile.TarFile.extractall

    def extract_together(self, *args, **kwargs):  # both runs are mid-extraction before either finishes
        both_extracting.wait()
        return extractall(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract_together)
    found, errors = [], []

    def run():
        try:
            found.append(data_sources._extract_archive(archive))
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(found) == 2 and found[0] == found[1]
    assert sorted(p.name for p in (found[0] / "train").iterdir()) == ["cat", "dog"]
    assert [p.name for p in found[0].parent.parent.iterdir()] == [found[0].parent.name]  # no half copy left


def test_validation_is_seeded_and_disjoint():
    x = np.arange(100).reshape(100, 1, 1, 1).astype(np.uint8)
    train, val = data.split_validation(x, np.zeros(100), 0.2, seed=3)
    train2, val2 = data.split_validation(x, np.zeros(100), 0.2, seed=3)
    assert len(val) == 20 and not set(train.x.ravel()) & set(val.x.ravel())
    np.testing.assert_array_equal(val.x, val2.x)


def test_corrupt_image_is_named(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "3.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(MskdError, match="3.png"):
        data.load_arrays(f"folder:{root}")


def test_mixed_image_sizes_are_named(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "test" / "cat" / "1.png")
    with pytest.raises(MskdError, match="1.png.*one size"):
        data.load_arrays(f"folder:{root}")


@pytest.mark.parametrize(
    "source, setup, message",
    [
        ("folder:{tmp}/missing", None, "does not exist"),
        ("folder:{tmp}/imgs", "empty_class", "has no images"),
        ("folder:{tmp}/imgs", "no_test", "test does not exist"),
        ("npz:{tmp}/d.npz", "bad_keys", r"lacks arrays \['x_test', 'y_test'\]"),
        ("npz:{tmp}/nothing.npz", None, "does not exist"),
        ("imagenet", None, "not understood"),
    ],
)
def test_bad_sources_say_what_is_wrong(tmp_path, source, setup, message):
    if setup in ("empty_class", "no_test"):
        root = _write_folder(tmp_path / "imgs")
        if setup == "empty_class":
            (root / "train" / "bird").mkdir()
        else:
            import shutil

            shutil.rmtree(root / "test")
    if setup == "bad_keys":
        np.savez(tmp_path / "d.npz", x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2))
    with pytest.raises(MskdError, match=message):
        data.load_arrays(source.format(tmp=tmp_path))


def test_npz_source_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (20, 6, 6), dtype=np.uint8), y_train=np.arange(20) % 4,
             x_test=rng.integers(0, 255, (8, 6, 6), dtype=np.uint8), y_test=np.arange(8) % 4)
    x_train, y_train, x_test, _, classes = data.load_arrays(f"npz:{tmp_path / 'd.npz'}")
    assert x_train.shape == (20, 6, 6, 1) and len(classes) == 4 and y_train.dtype == np.int64


def test_offline_tfds_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(MskdError, match="--download"):
        data.load_arrays("tfds:mnist", data_dir=str(tmp_path), download=False)
    assert time.monotonic() - start < 30


@pytest.mark.skipif(not data_sources.FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian():
    x_train, y_train, x_test, y_test, classes = data.load_arrays("fashion_mnist")
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(y_train).tolist() == [6000] * 10 and classes[9] == "ankle boot"


def test_an_uncached_eval_pipeline_reads_a_few_batches_without_the_partial_cache_warning():
    # BatchNorm recalibration takes 10 batches of the training split per candidate: with a cache TF
    # discarded the partial cache and logged "did not fully read the dataset being cached" every time.
    # TF's C++ log is silenced in this process (conftest), so each pipeline runs in a child that logs.
    script = """
import sys, numpy as np
from mskd_tf import data, data_sources
arrays = data.Arrays(np.random.default_rng(0).integers(0, 255, (40, 4, 4, 1), dtype=np.uint8), np.arange(40) % 10)
ds = data.eval_pipeline(arrays, 8, cache=sys.argv[1] == "cache")
x = np.concatenate([b.numpy() for b, _ in ds.take(2)])
np.testing.assert_allclose(x, arrays.x[:16] / 255.0, atol=1e-6)
del ds
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    for mode in ("cache", "no-cache"):
        run = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        warned = "did not fully read the dataset being cached" in run.stderr
        assert warned == (mode == "cache"), mode  # the cached pipeline still warns: the check can tell them apart
