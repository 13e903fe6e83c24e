"""What the pipeline's stages share in one run: config, work dir, data and the artifacts loaded so far.

:class:`Context` is handed to every stage; :func:`user_data` adapts the data given to ``compress()`` (tf.data
datasets or numpy arrays, checked before any training) to what the stages read.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from mskd_tf import data as data_lib
from mskd_tf.config import Config
from mskd_tf.errors import MskdError
from mskd_tf.workdir import Workdir


@dataclasses.dataclass
class UserData:
    """Data handed to ``compress()`` rather than named by a source string."""

    train: object
    val: object
    test: object
    info: data_lib.DatasetInfo
    fresh_train: object = None  # (first_epoch=0) -> a new training pipeline (numpy splits); None: the user's own


def user_data(model, train, val, test, *, batch_size: int, seed: int, class_names=None) -> UserData:
    """Accept tf.data datasets of (images, labels) batches or numpy (x, y) tuples, checked before any training.

    Numpy splits are checked whole, datasets on their first batch, by :func:`mskd_tf.data.check_splits`
    (the check the CLI's ``--dataset`` sources go through): finite images of the model's input shape,
    whole-number labels within the model's outputs. Errors name the argument (``train``, ``val``, ``test``).
    """
    import tensorflow as tf

    def is_arrays(value):
        return isinstance(value, (tuple, list)) and len(value) == 2

    for name, value in (("train", train), ("val", val), ("test", test)):
        if value is None and name != "train":
            continue
        if not (isinstance(value, tf.data.Dataset) or is_arrays(value)):
            raise MskdError(f"{name}: expected a tf.data.Dataset or an (x, y) tuple of arrays, got {type(value).__name__}.")
        if isinstance(value, tf.data.Dataset):
            spec = value.element_spec
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise MskdError(f"{name}: a dataset must yield (images, labels) batches; it yields {spec}.")
    if val is None and isinstance(train, tf.data.Dataset):
        raise MskdError("val: pass validation data (a dataset or (x, y)); it is needed to select candidates.")
    num_classes = int(model.output_shape[-1])
    given = {}
    for name, value in (("train", train), ("val", val), ("test", test)):
        if value is None:
            continue
        if isinstance(value, tf.data.Dataset):  # the first batch stands for the rest: a dataset may be endless
            batch = next(iter(value.take(1)), None)
            if batch is None:
                raise MskdError(f"{name}: the dataset yields no batches.")
            value = (batch[0].numpy(), batch[1].numpy())
            if value[1].ndim == 0:
                raise MskdError(f"{name}: the dataset yields single examples, not batches; add .batch(128).")
        given[name] = value
    checked = data_lib.check_splits(given, num_classes=num_classes, classes_from=f"the model has {num_classes} outputs",
                                    image_shape=tuple(model.input_shape[1:]), shape_from="the model")
    if val is None:
        tr, va = data_lib.split_validation(checked["train"].x, checked["train"].y, 0.1, seed)
        if len(va) == 0 or len(tr) == 0:
            raise MskdError(f"train: {len(checked['train'])} images are too few to hold out 10% for validation; "
                            "pass more images or val=(x, y).")
        checked["train"], checked["val"] = tr, va
    info = data_lib.DatasetInfo(
        name="user", image_shape=tuple(model.input_shape[1:]), num_classes=num_classes,
        class_names=tuple(class_names or (str(i) for i in range(num_classes))),
        mean=(), std=(), num_train=-1, num_val=-1, num_test=-1,
    )

    def pipeline(name, value, first_epoch=0):
        if isinstance(value, tf.data.Dataset):
            return value.with_options(data_lib.without_autotuning())
        if name == "train":
            return data_lib.train_pipeline(checked[name], batch_size, augment=False, seed=seed, first_epoch=first_epoch)
        return data_lib.eval_pipeline(checked[name], 2 * batch_size)

    train_ds, val_ds = pipeline("train", train), pipeline("val", val)
    test_ds = val_ds if test is None else pipeline("test", test)
    fresh = None if isinstance(train, tf.data.Dataset) else (lambda first_epoch=0: pipeline("train", train, first_epoch))
    return UserData(train=train_ds, val=val_ds, test=test_ds, info=info, fresh_train=fresh)


# The flags that decide which images each split holds (augmentation and batching only change how they are read).
DATA_FLAGS = ("dataset", "data_dir", "val_fraction", "train_subset", "seed")


@dataclasses.dataclass
class Context:
    """What the stages share in one run: config, workdir, data, loaded artifacts."""

    cfg: Config
    wd: Workdir
    user_teacher: object = None
    user_data: UserData | None = None
    _splits: object = None
    _calibration: object = None
    _models: dict = dataclasses.field(default_factory=dict)
    stage_digest: str = ""  # the running stage's settings digest (keys its mid-stage backup)
    cluster: object = None  # mskd_tf.multiworker.Cluster under --strategy=multi_worker

    @property
    def writes(self) -> bool:
        """Whether this process writes artifacts: always, except on the workers that are not the chief."""
        return self.cluster is None or self.cluster.is_chief

    @property
    def data(self):
        """Train / val / test pipelines and info (the user's, or loaded from --dataset)."""
        if self.user_data is not None:
            return self.user_data
        if self._splits is None:
            c = self.cfg
            self._splits = data_lib.load(
                c.dataset, batch_size=c.batch_size, val_fraction=c.val_fraction, augment=c.augment, seed=c.seed,
                train_subset=c.train_subset or None, data_dir=c.data_dir or None, download=c.download,
            )
            self.wd.check_data({k: getattr(c, k) for k in DATA_FLAGS}, data_lib.fingerprint(self._splits.arrays),
                               {split: len(a) for split, a in self._splits.arrays.items()}, write=self.writes)
            info = self._splits.info
            print(f"data: {info.name}: {info.num_train} train / {info.num_val} val / {info.num_test} test images "
                  f"of {info.image_shape}, {info.num_classes} classes", flush=True)
        return self._splits

    def train_data(self, first_epoch: int = 0):
        """A new training pipeline, whose first pass is epoch ``first_epoch`` of the seed's orders, for each run.

        A pipeline re-shuffles (and re-augments) on every pass, so runs sharing one would see an order that
        depends on how many passes earlier runs drew from it: the select stage of an uninterrupted run and of a
        resumed one trained on different orders (the quickstart chose l1-global in one, fpgm-global in the
        other), and distill's cross-entropy baseline did not see the batches its KD run saw. A run resumed after
        epoch ``e`` passes ``first_epoch=e`` and continues the uninterrupted run's orders. A dataset the user passed
        in is used as given (its order on resuming is the dataset's own).
        """
        d = self.data
        if isinstance(d, UserData):
            return d.fresh_train(first_epoch) if d.fresh_train is not None else d.train
        c = self.cfg
        return data_lib.train_pipeline(d.arrays["train"], c.batch_size, augment=c.augment, seed=c.seed,
                                       first_epoch=first_epoch)

    def selection_train(self):
        """What ``select`` trains on: :meth:`train_data` itself where it builds a new pipeline per call (every
        candidate then trains on the same batches), else the user's one dataset, which candidates share (and the
        selection record says so)."""
        d = self.data
        if isinstance(d, UserData) and d.fresh_train is None:
            return d.train
        return self.train_data

    @property
    def calibration(self):
        """Un-augmented training batches: for data-driven criteria and int8 calibration (never read whole).

        Built once: a pipeline copies the training arrays into a tensor (about a second for CIFAR-10), and BatchNorm
        re-estimation reads it for every candidate and sensitivity probe."""
        d = self.data
        if isinstance(d, UserData):
            return d.train
        if self._calibration is None:
            self._calibration = data_lib.eval_pipeline(d.arrays["train"], self.cfg.batch_size, cache=False)
        return self._calibration

    def model(self, name: str):
        """Load (once) a .keras artifact from the workdir."""
        if name not in self._models:
            import keras

            self._models[name] = keras.models.load_model(self.wd / name)
        return self._models[name]

    def remember(self, name: str, model):
        self._models[name] = model

    def strategy(self):
        """The --strategy's tf.distribute strategy, or None for the default one."""
        if self.cfg.strategy == "default":
            return None
        from mskd_tf.distribute import make_strategy

        return make_strategy(self.cfg.strategy, self.cfg.num_replicas)

    def epoch_backup(self, name: str) -> Path:
        """The folder ``name`` of a loop's epoch backups, emptied when it was written for other settings."""
        folder = self.wd / name
        marker = folder / "settings_digest"
        if folder.exists() and (not marker.exists() or marker.read_text() != self.stage_digest):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.stage_digest)
        return folder


def evaluate(model, dataset) -> float:
    """Top-1 accuracy of a logits/probabilities model on a (images, labels) dataset."""
    from mskd_tf import training

    return training.accuracy(model, dataset)


def cost(model) -> dict:
    from mskd_tf import flops

    counted = flops.count(model)
    return {"macs": int(counted.macs), "params": int(counted.params)}


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def verbose() -> int:
    """Keras fit's verbosity: a progress bar on a terminal, one line per epoch in a log."""
    return 1 if sys.stdout.isatty() else 2
