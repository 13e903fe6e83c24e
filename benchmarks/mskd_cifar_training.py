"""A study's rows trained: each row's student (a candidate, the zero-cost pick or the library selection's pick)
fine-tuned or distilled for the budget from its epoch backup, exported to int8, and cached in the table."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import artifacts
import keras
from mskd_cifar_rows import (POOL_SETTINGS, candidate_set, candidate_set_tag, row_key, row_of, zero_cost_pick,
                             zero_cost_twins)
from mskd_cifar_sets import pipeline_config, prepare, stored_candidates

from mskd_tf import data as data_lib
from mskd_tf import deploy, distill, flops, selection, training
from mskd_tf.errors import MskdError
from mskd_tf.keras_utils import weights_digest


class RowTrainer:
    """Trains the rows of one table (``res``) on one sitting's data (``splits``) from the decisive candidate set's
    work dir ``wd`` (its teacher trained, its candidates built); the other candidate sets' stages run when a row
    first needs them."""

    def __init__(self, s: dict, res, splits, wd: Path, *, mirror: bool):
        self.s, self.res, self.wd, self.mirror = s, res, wd, mirror
        self.arrays, self.val, self.test = splits.arrays, splits.val, splits.test
        self.per_epoch = training.steps_per_epoch(splits.train)
        self.budget = training.budget_steps(s["budget"], self.per_epoch)
        self.calibration = data_lib.eval_pipeline(splits.arrays["train"], s["batch_size"], cache=False)
        self._inputs = {}  # candidate set -> (work dir, teacher, candidates): what that set's rows start from

    def inputs_of(self, target, allocations=None):
        """A candidate set's work dir, teacher and candidates; the stages of another set (another MACs target or
        other allocations) run when the plan first reaches it, and if its files changed its cached rows are dropped."""
        s, res = self.s, self.res
        key = target, allocations
        if key not in self._inputs:
            wd_t = self.wd
            if key != (s["target_macs"], None):
                wd_t, digests_t = prepare(s, target, teacher_path=str(self.wd / "teacher.keras"),
                                          allocations=allocations, mirror=self.mirror)
                tag = candidate_set_tag(target, allocations)
                if res.data["targets"].get(tag) != digests_t:
                    res.data["rows"] = {k: r for k, r in res.data["rows"].items() if candidate_set(row_of(r)) != key}
                    res.data["targets"][tag] = digests_t
            self._inputs[key] = (wd_t, keras.models.load_model(wd_t / "teacher.keras"),
                                 stored_candidates(s, target, allocations))
        return self._inputs[key]

    def train_for(self, seed, first_epoch=0):  # seed 0 is the pipeline's own order; others reshuffle / re-augment
        return data_lib.train_pipeline(self.arrays["train"], self.s["batch_size"], augment=True, seed=seed,
                                       first_epoch=first_epoch)

    def int8_export(self, student, row) -> dict:
        """The row's student exported as the export stage ships it (full int8, calibrated on training images), and
        its test accuracy in LiteRT beside the Keras model's; the .tflite stays in the candidate set's work dir."""
        s = self.s
        out = Path(pipeline_config(s, row.target).workdir) / "int8" / re.sub(r"[^\w.@=+-]", "_", row_key(row, s))
        exported = deploy.export_all(student, str(out), kinds=("int8",), representative_ds=self.calibration,
                                     test_ds=self.test, micro=False, threads=(1,), seed=row.seed)[0]
        return {"int8_test_acc": exported["test_acc"], "int8_bytes": exported["bytes"],
                "int8_agreement": exported["agreement"]}

    def train(self, row, teacher, source, *, extra, steps=None):
        """Fine-tune the network in ``source`` for ``steps`` (default: the budget) under the row's loss and
        settings; cache the row."""
        s, res, per_epoch = self.s, self.res, self.per_epoch
        steps = self.budget if steps is None else steps
        kd = row.loss == "kd"
        # A select+ce row's settings are its selection's; its own run is the table's CE run. A candidate set's
        # allocations chose the network, not how it trains.
        own = {} if row.kind == "select+ce" else {k: v for k, v in row.settings
                                                  if k not in (*POOL_SETTINGS, "allocations")}
        lr = own.pop("lr", s["kd_lr"] if kd else s["finetune_lr"])
        loss = {"temperature": s["temperature"], "alpha": s["alpha"], "feature_kd": 0.0, **own}
        keras.utils.set_random_seed(row.seed)
        student = keras.models.load_model(source)
        # A row trains for most of an hour: its epoch backup lets the next sitting resume it where this one ends.
        # Named by the row and the weights it starts from, so a changed start never resumes an old backup.
        backup = Path(s["workdir"]) / "row_backups" / hashlib.sha256(
            f"{row_key(row, s)}:{weights_digest(student)}".encode()).hexdigest()[:16]
        done = training.epochs_backed_up(backup)
        spent = backup / "seconds.json"  # after each epoch's backup: a kill in between leaves that epoch uncounted
        earlier = json.loads(spent.read_text())["seconds"] if done and spent.exists() else 0.0
        if done:
            print(f"row {row_key(row, s)}: resuming after epoch {done} from {backup}", flush=True)
        start = time.perf_counter()
        backup.mkdir(parents=True, exist_ok=True)
        callbacks = [keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch", delete_checkpoint=False),
                     keras.callbacks.CSVLogger(str(backup / "history.csv"), append=done > 0),
                     keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: spent.write_text(
                         json.dumps({"seconds": earlier + time.perf_counter() - start})))]
        # Validation after every epoch (~3 s each): from the oracle rows, how early a short run ranks the
        # candidates as B steps do, i.e. which selection horizon could be predictive, at no training cost.
        student, history = distill.distill(teacher, student, self.train_for(row.seed, done), self.val,
                                           epochs=steps / per_epoch, steps=steps, kd=kd, **loss, lr=lr,
                                           weight_decay=s["weight_decay"], seed=row.seed, callbacks=callbacks,
                                           verbose=2)
        if done:  # this sitting saw only the epochs after the backup; the CSV has them all
            history = training.history_from_csv(backup / "history.csv") or history
        cost = flops.count(student)
        record = {"kd": kd, **({"kd_settings": loss} if kd else {}), "seed": row.seed, "lr": lr,
                  "train_steps": steps, "seconds": round(earlier + time.perf_counter() - start, 1),
                  **({"resumed_after_epoch": done} if done else {}),
                  "val_acc": training.accuracy(student, self.val), "test_acc": training.accuracy(student, self.test),
                  "macs": int(cost.macs), "params": int(cost.params),
                  "val_curve": [round(float(v), 4) for v in history.get("val_accuracy", [])], **extra}
        record["total_steps"] = record["train_steps"] + record.get("selection_steps", 0)
        print(f"row {row_key(row, s)}: val {100 * record['val_acc']:.2f}%  test {100 * record['test_acc']:.2f}%  "
              f"({record['total_steps']} steps, {record['seconds']:.0f} s)", flush=True)
        res.put(row, record, finished=False)  # cached before the export: a failed export cannot cost the training
        shutil.rmtree(backup, ignore_errors=True)
        try:
            record.update(self.int8_export(student, row))
            print(f"row {row_key(row, s)}: int8 test {100 * record['int8_test_acc']:.2f}%", flush=True)
        except MskdError as exc:
            record["int8_error"] = str(exc)
        res.put(row, record)

    def selection_of(self, row, wd_t, teacher, candidates_t):
        """The library's select stage for a mskd or select+ce row: its select row, computed unless cached (with
        its network on disk); returns that row, the selected network's file and the capacity pool's ratio."""
        s, res = self.s, self.res
        ratio = dict(row.settings).get("min_params_ratio", s["min_params_ratio"])
        kd_settings = {"lr": s["kd_lr"], **{k: v for k, v in row.settings if k not in POOL_SETTINGS}}
        # Folder names say the rate when it is not finetune_lr (the default KD rate before Config.kd_lr_scale).
        folder_settings = {k: v for k, v in kd_settings.items() if k != "lr" or v != s["finetune_lr"]}
        out = wd_t / (f"select_s{row.seed}" + (f"_minparams{ratio:g}" if ratio else "")  # ratio 0: the original folders
                      + (f"_{s['capacity_reference']}" if ratio else "")  # "_minparams0.9": x the largest
                      + "".join(f"_{k}{v:g}" for k, v in sorted(folder_settings.items())))
        select_row = dataclasses.replace(row, kind="select", loss="kd")
        if not res.row(select_row) or not (out / "selected.keras").exists():
            start = time.perf_counter()
            payload = selection.select(
                {c: str(wd_t / "candidates" / f"{c}.keras") for c, r in candidates_t.items() if "same_as" not in r},
                lambda: self.train_for(row.seed), self.val,
                workdir=str(out), epochs=s["select_epochs"], zero_cost_keep=s["zero_cost_keep"],
                zero_cost_scores={c: r["val_acc_before_finetune"] for c, r in candidates_t.items()},
                candidate_costs=candidates_t,
                min_params_ratio=ratio,
                teacher=teacher, temperature=kd_settings.get("temperature", s["temperature"]),
                alpha=kd_settings.get("alpha", s["alpha"]), lr=kd_settings["lr"],  # hints: distill only
                weight_decay=s["weight_decay"], seed=row.seed)
            res.put(select_row, {
                "seed": row.seed, "seconds": round(time.perf_counter() - start, 1), "min_params_ratio": ratio,
                "capacity_reference": s["capacity_reference"],
                "capacity_kept": (payload["protocol"]["capacity_pool"] or {}).get("kept"),
                "selected": payload["selected"], "total_steps": payload["protocol"]["total_steps"],
                # None: the capacity pool left no more than the rung keeps, so no zero-cost cut
                "zero_cost_kept": (payload["protocol"]["zero_cost"] or {}).get("kept"),
                "rungs": payload["protocol"]["rungs"],
                # where the selection's seconds went, over every candidate and rung
                # (the rest of "seconds" is outside the candidates: loading, the pools)
                "time_split": {k: round(v, 1) for k, v in selection.time_split_total(payload).items()}})
            if self.mirror:
                artifacts.save(wd_t)
        return res.row(select_row), out / "selected.keras", ratio

    def compute(self, row):
        """Train the row (a zc+kd row whose very run is cached already: a copy of it) and cache it."""
        s, res = self.s, self.res
        wd_t, teacher, candidates_t = self.inputs_of(*candidate_set(row))
        if row.kind == "student":
            self.train(row, teacher, wd_t / "candidates" / f"{row.candidate}.keras", extra={"criterion": row.candidate})
        elif row.kind == "zc+kd":
            top = zero_cost_pick(candidates_t, s)
            twins = zero_cost_twins(row, s, lambda *key: self.inputs_of(*key)[2])
            same_run = next((res.row(twin) for twin in twins if res.row(twin)), None)
            if same_run:
                res.put(row, same_run)
            else:
                self.train(row, teacher, wd_t / "candidates" / f"{top}.keras", extra={"criterion": top})
        else:  # mskd, select+ce: the selection's pick trains for what the selection left of the budget
            chosen, network, ratio = self.selection_of(row, wd_t, teacher, candidates_t)
            self.train(row, teacher, network, steps=self.budget - chosen["total_steps"],
                       extra={"criterion": chosen["selected"]["criterion"], "selection_steps": chosen["total_steps"],
                              "selection_seconds": chosen["seconds"], "min_params_ratio": ratio,
                              "capacity_reference": s["capacity_reference"]})
