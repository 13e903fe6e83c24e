"""A study's candidate sets: for each MACs target (and allocations), the pipeline's own teacher, rank and
candidates stages in a work dir of its own, restored from and mirrored to ``benchmarks/artifacts/`` (``mirror``);
the digests of what every row starts from."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import artifacts
import results_io
from mskd_cifar_rows import zero_cost_pick


def pipeline_config(s, target, teacher_path="", allocations=None):
    """The pipeline's settings for a candidate set: a MACs target and allocations (None: the library's default)."""
    from mskd_tf.config import Config

    suffix = (("" if target == s["target_macs"] else f"_t{round(100 * target)}")
              + (f"_{allocations}" if allocations else ""))
    return Config(dataset=s["dataset"], model=s["model"], width=s.get("width", 1.0), train_subset=s["train_subset"], batch_size=s["batch_size"],
                  teacher_epochs=s["teacher_epochs"], teacher_lr=s["teacher_lr"], schedule="cosine", weight_decay=s["weight_decay"],
                  teacher=teacher_path,
                  target_macs=target, round_to=s["round_to"], criteria_batches=10, select_epochs=s["select_epochs"],
                  zero_cost_keep=s["zero_cost_keep"], finetune_lr=s["finetune_lr"], student_epochs=s["budget"],
                  temperature=s["temperature"], alpha=s["alpha"], workdir=s["workdir"] + suffix, seed=0,
                  **({"allocations": tuple(allocations.split("+"))} if allocations else {}))


def guard_the_table(res, s, *, mirror: bool, new_teacher: bool):
    """Refuse to train a new teacher for a table that has rows: its digests would differ and the rows be dropped."""
    wd = Path(pipeline_config(s, s["target_macs"]).workdir)
    if mirror:
        artifacts.restore(wd)
    if res.data.get("rows") and not (wd / "teacher.keras").exists() and not new_teacher:
        raise SystemExit(
            f"error: {results_io.RESULTS / (s['name'] + '.json')} holds {len(res.data['rows'])} rows computed from a "
            f"teacher that is neither in {wd} nor in {artifacts.mirror_of(wd)}; this run would train a new one and "
            "drop them. Restore that work dir, use another --name, or pass --new_teacher to start the table over.")


def run_stages(s, target, teacher_path="", stop_after="candidates", allocations=None, *, mirror: bool) -> Path:
    """The pipeline's stages up to ``stop_after`` in the candidate set's work dir, restored from and mirrored to
    artifacts when ``mirror``."""
    from mskd_tf.api import run_pipeline

    cfg = pipeline_config(s, target, teacher_path, allocations)
    wd = Path(cfg.workdir)
    if mirror:
        artifacts.restore(wd)
        if teacher_path and artifacts.given_teacher(wd) and not (wd / "teacher.keras").exists():
            shutil.copy2(teacher_path, wd / "teacher.keras")  # the mirror keeps no copy of a given teacher
    run_pipeline(cfg, stop_after=stop_after)
    if mirror:
        artifacts.save(wd)
    return wd


def stored_candidates(s, target, allocations=None) -> dict:
    """A candidate set's candidates as its rows read them: its work dir's candidates.json, or the artifacts mirror's
    that a run restores it from; {} before the candidates stage has run."""
    wd = Path(pipeline_config(s, target, allocations=allocations).workdir)
    for folder in (wd, artifacts.mirror_of(wd)):
        stored = artifacts.read_json(folder, "candidates.json")
        if stored is not None:
            return {r["criterion"]: r for r in stored["candidates"]}
    return {}


def prepare(s, target, teacher_path="", allocations=None, *, mirror: bool):
    """teacher, rank, candidates through the pipeline's stages; returns the workdir and its digests."""
    wd = run_stages(s, target, teacher_path, allocations=allocations, mirror=mirror)
    return wd, input_digests(wd, s)


def input_digests(wd: Path, s: dict) -> dict:
    """What every row starts from, by content: the teacher's weights, each candidate's kept channels and the
    zero-cost pick. A teacher or candidate set that differs empties the rows; one rebuilt the same (a fresh clone
    rebuilds the candidates from the committed teacher and rankings; a .keras file's bytes differ at every save)
    keeps them."""
    import keras

    from mskd_tf.keras_utils import weights_digest

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    records = {r["criterion"]: r for r in json.loads((wd / "candidates.json").read_text())["candidates"]}
    return {"teacher_weights": weights_digest(keras.models.load_model(wd / "teacher.keras", compile=False)),
            "zero_cost_pick": zero_cost_pick(records, s),
            **{f"kept:{name}": digest(record["kept"]) for name, record in sorted(records.items())}}
