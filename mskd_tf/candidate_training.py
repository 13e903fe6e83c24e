"""Fine-tuning candidates for selection: a custom training loop exact under any ``tf.distribute`` strategy, and
each candidate's resumable state (checkpoint + JSON record in ``workdir/selection/``) across rungs and workers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import keras
import tensorflow as tf

from mskd_tf import flops, training
from mskd_tf.batchnorm import batchnorms, recalibrate_batchnorm
from mskd_tf.distribute import chief_values
from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import weights_digest, with_synchronized_batchnorm
from mskd_tf.training import make_optimizer
from mskd_tf.workdir import atomic_path

SELECTION_DIR = "selection"


class Finetuner:
    """Train and evaluate one classifier under a ``tf.distribute`` strategy with a custom loop.

    Exact under replicas: each replica's summed cross-entropy is divided by the
    *global* number of examples in the step (all-reduced, so uneven last batches
    are right too), and the optimizer sums the replicas' gradients. Accuracy is
    counted, not averaged. (Keras 3 ``fit``/``evaluate`` fail under
    ``MultiWorkerMirroredStrategy``, keras-team/keras#20585, so this loop serves
    every strategy alike.) ``model`` and ``optimizer`` must belong to ``strategy``.
    """

    def __init__(self, model, optimizer, strategy=None, *, from_logits: bool = True, teacher=None,
                 temperature: float = 4.0, alpha: float = 0.5):
        from mskd_tf.distill import LogitsTap

        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        self.from_logits = from_logits
        # With a teacher the loss is the Distiller's: alpha CE + (1 - alpha) T^2 KL.
        self.teacher = LogitsTap(teacher, "teacher") if teacher is not None else None
        self.temperature, self.alpha = float(temperature), float(alpha)
        self._train_step = training.per_instance_function(self._distributed_train_step)
        self._eval_step = training.per_instance_function(self._distributed_eval_step)
        # The train step's first two calls: the first traces it, so the difference is the tracing time.
        self.first_step_seconds = self.second_step_seconds = None

    def train(self, train_ds, steps: int, *, start: int = 0, steps_per_epoch: int | None = None) -> float | None:
        """Train ``steps`` batches of ``train_ds`` beginning at batch ``start`` (counted across epochs).

        ``start`` = 10 on a 4-batch dataset begins at batch 2 of a fresh pass, so a
        resumed fine-tune continues where it stopped. Returns None, or the first
        non-finite loss (training stops there).
        """
        _, bad_loss = training.run_steps(self._timed_train_step, train_ds, steps, strategy=self.strategy, start=start,
                                         batches_per_epoch=steps_per_epoch, what="select: train_ds")
        return bad_loss

    def _timed_train_step(self, batch):
        if self.second_step_seconds is not None:
            return self._train_step(batch)
        began = time.perf_counter()
        loss = float(self._train_step(batch))
        if self.first_step_seconds is None:
            self.first_step_seconds = time.perf_counter() - began
        else:
            self.second_step_seconds = time.perf_counter() - began
        return loss

    def accuracy(self, dataset) -> float:
        """Top-1 accuracy over all of ``dataset``."""
        correct = total = 0
        for batch in self.strategy.experimental_distribute_dataset(dataset):
            right, count = self._eval_step(batch)
            correct, total = correct + int(right), total + int(count)
        if total == 0:
            raise MskdError("select: the validation dataset is empty.")
        return correct / total

    def _distributed_train_step(self, batch):
        per_replica = self.strategy.run(self._replica_train_step, args=batch)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _replica_train_step(self, images, labels):
        context = tf.distribute.get_replica_context()
        labels = tf.reshape(labels, [-1])
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.size(labels), tf.float32))
        with tf.GradientTape() as tape:
            outputs = self.model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=self.from_logits)
            if self.teacher is not None:
                from mskd_tf.distill import kd_per_example

                teacher_logits, _ = self.teacher(images, training=False)
                logits = outputs if self.from_logits else tf.math.log(tf.maximum(outputs, 1e-30))
                per_example = self.alpha * per_example + (1.0 - self.alpha) * kd_per_example(
                    teacher_logits, logits, self.temperature)
            loss = tf.reduce_sum(per_example) / tf.maximum(global_count, 1.0)
            if self.model.losses:  # regularizers: each replica adds its share
                loss += tf.add_n(self.model.losses) / context.num_replicas_in_sync
        gradients = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return loss

    def _distributed_eval_step(self, batch):
        right, count = self.strategy.run(self._replica_eval_step, args=batch)
        total = lambda v: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
        return total(right), total(count)

    def _replica_eval_step(self, images, labels):
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        predicted = tf.argmax(self.model(images, training=False), axis=-1, output_type=tf.int64)
        return tf.reduce_sum(tf.cast(predicted == labels, tf.int64)), tf.size(labels, out_type=tf.int64)


class CandidateTrainer:
    """Holds each candidate's state (the per-candidate JSON) and its live model."""

    def __init__(self, candidates, train_ds, val_ds, *, workdir, settings, strategy, steps_per_epoch, writes,
                 verbose, rank, teacher=None, fresh_train=None):
        self.sources = candidates
        self.teacher = teacher
        self.train_ds, self.val_ds = train_ds, val_ds
        self.fresh_train = fresh_train  # () -> a new pipeline: the same batches for every candidate
        self.folder = workdir / SELECTION_DIR
        self.settings, self.strategy = settings, strategy
        self.steps_per_epoch, self.writes, self.verbose, self.rank = steps_per_epoch, writes, verbose, rank
        self.sync_bn = strategy.num_replicas_in_sync > 1
        self.models: dict[str, Finetuner] = {}
        self._score_copies: dict[str, keras.Model] = {}  # candidate -> the plain copy it is scored on
        self._recalibration_batches: list | None = None  # built at the first score, reused by every later one
        # Validation accuracy at step 0 where the zero-cost rung already measured it: not measured twice.
        self.accuracy_before_training: dict[str, float] = {}
        self.digests = {name: source_digest(source) for name, source in candidates.items()}
        # Read once, before any collective step, so every worker starts from the same state.
        self.state = {name: self._read_state(name) for name in candidates}

    # ------------------------------------------------------------------ files

    def checkpoint(self, name) -> Path:
        return self.folder / f"{name}.keras"

    def _record(self, name) -> Path:
        return self.folder / f"{name}.json"

    def _read_state(self, name):
        try:
            state = json.loads(self._record(name).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if state.get("settings") != self.settings or state.get("source") != self.digests[name]:
            return None  # trained with other settings or from another candidate: start over
        if not state.get("error") and not self.checkpoint(name).exists():
            return None
        return state

    def _save_checkpoint(self, name, model):
        if self.writes:
            save_atomic(self.checkpoint(name), model.save)

    def _save_record(self, name):
        """The candidate's JSON, written once its state is final: in parallel mode another worker takes a
        record at the rung's step count as finished (so it comes after the checkpoint, and only once)."""
        if self.writes:
            save_atomic(self._record(name), lambda tmp: Path(tmp).write_text(json.dumps(self.state[name], indent=2)))

    def row(self, name) -> dict:
        state = self.state[name]
        keys = ("criterion", "macs", "params", "curve", "val_acc", "budget_epochs", "seconds", "time_split", "steps",
                "weights", "worker", "error")
        return {k: state[k] for k in keys if k in state}

    def forget(self, names):
        for name in names:
            self.models.pop(name, None)
            self._score_copies.pop(name, None)

    # ------------------------------------------------------------------ training

    def _source(self, name) -> keras.Model:
        source = self.sources[name]
        if isinstance(source, keras.Model):
            return source
        try:
            return keras.models.load_model(source, compile=False)
        except Exception as exc:  # any unreadable file: name it
            raise MskdError(f"candidate {name!r}: cannot load {source} as a Keras model ({exc}); re-run the "
                            "candidates stage or pass a keras.Model.") from exc

    def _live_model(self, name) -> Finetuner:
        """The candidate's :class:`Finetuner` under the strategy, at ``state['steps']`` steps."""
        if name in self.models:
            return self.models[name]
        state = self.state[name]
        resumed = state is not None and state["steps"] > 0
        # A model loaded here from a file is this selection's own: on one replica it trains as loaded (made in the
        # strategy's scope). A caller's keras.Model is copied, never trained in place, and so is every model that
        # several replicas train with synchronized BatchNorm. (A copy costs ~0.2 s a candidate.)
        own = resumed or not isinstance(self.sources[name], keras.Model)
        with self.strategy.scope() if own and not self.sync_bn else contextlib.nullcontext():
            start = keras.models.load_model(self.checkpoint(name), compile=resumed) if resumed else self._source(name)
        keras.utils.set_random_seed(self.settings["seed"])  # inside select's seeded block: restored on exit
        with self.strategy.scope():
            as_loaded = own and not self.sync_bn and not any(bn.synchronized for bn in batchnorms(start))
            model = start if as_loaded else with_synchronized_batchnorm(start, self.sync_bn)
            optimizer = make_optimizer(self.settings["optimizer"], self.settings["lr"], total_steps=1,
                                       schedule="constant", weight_decay=self.settings["weight_decay"])
            optimizer.build(model.trainable_variables)
            if resumed and start.optimizer is not None and start.optimizer.built:
                for mine, saved in zip(optimizer.variables, start.optimizer.variables):
                    mine.assign(saved)  # momentum and step count continue where they stopped
            # Compiled only so that checkpoints carry the optimizer state.
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        tuner = Finetuner(model, optimizer, self.strategy, from_logits=not training.outputs_probabilities(start),
                          teacher=self.teacher, temperature=self.settings.get("temperature", 4.0),
                          alpha=self.settings.get("alpha", 0.5))
        if state is None:
            cost = flops.count(start)
            self.state[name] = {
                "criterion": name, "macs": int(cost.macs), "params": int(cost.params),
                "curve": [[0.0, self.accuracy_before_training.get(name) or tuner.accuracy(self.val_ds)]],
                "val_acc": None, "budget_epochs": 0.0,
                "seconds": 0.0, "steps": 0, "settings": self.settings, "source": self.digests[name],
                "worker": self.rank,
            }
        self.models[name] = tuner
        return tuner

    def train_to(self, name, target_steps, rung=""):
        """Fine-tune ``name`` until it has seen ``target_steps`` batches, evaluating at every epoch end."""
        state = self.state[name]
        if state is not None and (state["steps"] >= target_steps or state.get("error")):
            return  # finished earlier (this run or a previous one)
        began = time.perf_counter()
        fresh = name not in self.models
        tuner = self._live_model(name)
        state = self.state[name]
        # Where the rung's seconds go: setup = load + first validation, trace = the train
        # step's first call beyond one ordinary step, score = BatchNorm re-estimation + validation.
        split = {"setup": time.perf_counter() - began, "train": 0.0, "trace": 0.0, "score": 0.0, "save": 0.0}
        while state["steps"] < target_steps:
            epoch_end = (state["steps"] // self.steps_per_epoch + 1) * self.steps_per_epoch
            chunk = min(target_steps, epoch_end) - state["steps"]
            clock = time.perf_counter()
            if self.fresh_train is not None:  # batch k of every candidate's run is the same batch
                stream = self.fresh_train().repeat().skip(state["steps"]).take(chunk)
                bad_loss = tuner.train(stream, chunk, steps_per_epoch=chunk)
            else:
                bad_loss = tuner.train(self.train_ds, chunk, start=state["steps"], steps_per_epoch=self.steps_per_epoch)
            split["train"] += time.perf_counter() - clock
            state["steps"] += chunk
            state["budget_epochs"] = round(state["steps"] / self.steps_per_epoch, 4)
            if bad_loss is not None:
                state["val_acc"] = None
                state["error"] = f"the loss became {bad_loss} within {state['steps']} steps"
                self.forget([name])
                break
            clock = time.perf_counter()
            state["val_acc"] = self._score(name, tuner)
            state.setdefault("scores", {})[str(state["steps"])] = state["val_acc"]  # JSON keys: strings
            split["score"] += time.perf_counter() - clock
            state["curve"].append([state["budget_epochs"], state["val_acc"]])
        if fresh and tuner.second_step_seconds is not None:
            # One ordinary step's time stays in "train"; the rest of the first call was tracing.
            split["trace"] = max(0.0, tuner.first_step_seconds - tuner.second_step_seconds)
            split["train"] -= split["trace"]
        if not state.get("error"):
            state["weights"] = weights_digest(tuner.model)  # each worker's copy; equal when synchronous
        clock = time.perf_counter()
        if not state.get("error"):
            self._save_checkpoint(name, tuner.model)
        split["save"] = time.perf_counter() - clock
        spent = time.perf_counter() - began
        state["seconds"] = round(state["seconds"] + spent, 3)
        state.setdefault("time_split", []).append({"rung": rung, **{k: round(v, 2) for k, v in split.items()}})
        self._save_record(name)
        if self.verbose:
            result = state.get("error") or f"val acc {100 * state['val_acc']:.2f}%"
            parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items())
            print(f"select: rung {rung}: {name} at {state['budget_epochs']:g} epochs: {result} "
                  f"({spent:.1f} s this rung: {parts})", flush=True)

    def _score(self, name, tuner) -> float:
        """Validation accuracy after re-estimating BatchNorm statistics (no optimizer step).

        At a constant, fairly high learning rate the moving averages trail the weights, and a
        rung would compare how stale each candidate's statistics are rather than how good it is.
        Training's own statistics are put back after the validation pass (on several replicas the
        recalibration runs on a plain copy instead), so the trained model, its checkpoint and every
        replica stay exactly as training left them (and equal under any strategy).
        """
        batches = self.settings.get("bn_recalibration_batches", 0)
        if not batches:
            return tuner.accuracy(self.val_ds)
        if self._recalibration_batches is None:
            # The same batches for every candidate and rung, drawn once: with a fresh pipeline per score the 8
            # re-estimations of a CIFAR selection_cost run took 6.4 s, drawn once 4.4 s; 10 batches of 128 are 16 MB.
            source = self.fresh_train() if self.fresh_train is not None else self.train_ds
            self._recalibration_batches = list(source.take(batches))
        if not self.sync_bn:
            # One replica: re-estimate on the trained model itself and put training's statistics back after the
            # validation pass; the same numbers as on a copy, without the copy (~0.2 s a candidate).
            layers = batchnorms(tuner.model)
            kept = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in layers]
            try:
                recalibrate_batchnorm(tuner.model, self._recalibration_batches, batches)
                accuracy = training.accuracy(tuner.model, self.val_ds, "select: val_ds")
            finally:
                for bn, (mean, variance) in zip(layers, kept):
                    bn.moving_mean.assign(mean)
                    bn.moving_variance.assign(variance)
        else:
            # Several replicas: the model's variables are mirrored and its BatchNorm synchronized; score a plain
            # copy, one per candidate so its traced functions serve every rung.
            copy = self._score_copies.get(name)
            if copy is None:
                copy = self._score_copies[name] = with_synchronized_batchnorm(tuner.model, False)
            else:
                copy.set_weights(tuner.model.get_weights())
            recalibrate_batchnorm(copy, self._recalibration_batches, batches)
            accuracy = training.accuracy(copy, self.val_ds, "select: val_ds")
        # Scored outside the strategy, on this worker's own batches: lock-step workers take the chief's number,
        # or they rank differently and the next rung's collectives mix different candidates.
        return chief_values(self.strategy, [accuracy])[0]

    def wait_for(self, names, target_steps, *, timeout, workers, check=None):
        """Block until every candidate in ``names`` has a record at ``target_steps`` (parallel mode)."""
        order = list(self.sources)
        deadline = time.monotonic() + timeout
        while True:
            missing = []
            for name in names:
                state = self._read_state(name)
                if state is not None and (state["steps"] >= target_steps or state.get("error")):
                    self.state[name] = state
                else:
                    missing.append(name)
            if not missing:
                return
            if check is not None:
                check()
            if time.monotonic() > deadline:
                owners = ", ".join(f"{n} (worker {order.index(n) % workers})" for n in missing)
                raise MskdError(f"select: waited {timeout:g} s for candidates trained by other workers: {owners}. "
                                "Check that every worker runs with the same flags and a shared --workdir.")
            time.sleep(0.5)


def source_digest(source) -> str:
    """Identifies a candidate: its file's bytes, or its weights; a changed candidate restarts."""
    if isinstance(source, keras.Model):
        return weights_digest(source)
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise MskdError(f"select: cannot read candidate file {source} ({exc.strerror}); re-run the "
                        "candidates stage.") from None


def save_atomic(path: Path, write) -> None:
    """Call ``write(tmp)`` (``model.save``, a text writer) on a temporary name beside ``path``, then rename it."""
    with atomic_path(path) as tmp:
        write(str(tmp))
