"""A long benchmark's resumable files, kept in the repository so that a fresh clone resumes it.

A benchmark's work dir (``runs/``, ignored by git) holds hours of training: the teacher's epoch backup,
then the teacher, rankings and candidates every row starts from. A working session ends without warning and
the next one may start from a fresh clone, where ``runs/`` is empty: the teacher would train again, come out
different, and empty a half-built table (its rows are keyed by the teacher's weights and the candidates' kept
channels). So the script mirrors what a rerun cannot rebuild in minutes into
``benchmarks/artifacts/<work dir name>/`` as it appears, the session commits that folder with the rows, and
the next run copies it back into an empty work dir before any stage looks.

Kept: the teacher (its epoch backup while it trains; the teacher itself without optimizer state), the stage
records and the JSON files (rankings, the candidates' record; those over 64 KB gzipped in the mirror, ``.json.gz``:
a MobileNetV2's channel scores and kept-channel lists are a megabyte each as text, a fifth of that gzipped).
Not kept: the candidates' networks (the candidates stage rebuilds them from the teacher and rankings in a few
minutes, the same channels), selected networks (the benchmark reselects when one is
missing), logs, and a teacher that was itself copied from another file (``--teacher``: the benchmark copies
it again). Trained networks stay out of git otherwise (``.gitignore``).

    python benchmarks/artifacts.py save runs/bench_mskd_cifar_t120   # mid-teacher: the latest epoch backup
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Relative to a work dir; see the module docstring for why these and no others.
KEPT = ("teacher_backup/*", "logs/teacher/history.csv", "teacher_best.keras", "teacher.keras", "teacher.json",
        "stages.json", "records/*.json", "rankings.json", "candidates.json")


# Networks later stages only read (never train on): mirrored without the optimizer state their training left in
# them (SGD momentum, as large as the weights), so the teachers in git take half the space.
WEIGHTS_ONLY = ("teacher.keras", "teacher_best.keras")
GZIPPED_ABOVE = 64 * 1024  # bytes of a JSON file the mirror keeps gzipped (as name.json.gz)


def _save_weights_only(source: Path, target: Path) -> None:
    """``source`` saved again at ``target`` without optimizer state, with the source's modification time."""
    import keras

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.keras")
    keras.models.load_model(source, compile=False).save(tmp)
    tmp.replace(target)
    stamp = os.path.getmtime(source)
    os.utime(target, (stamp, stamp))


def kept_files(workdir: Path) -> list[Path]:
    """The kept files in a work dir or a mirror (where a gzipped JSON file stands for its ``.json``)."""
    patterns = KEPT + tuple(f"{p}.gz" for p in KEPT if p.endswith(".json"))
    files = {p for pattern in patterns for p in workdir.glob(pattern) if p.is_file()}
    if given_teacher(workdir):
        files.discard(workdir / "teacher.keras")
    return sorted(files)


def given_teacher(workdir: Path) -> str:
    """The file the work dir's teacher stage copied its teacher from ("" when it trained one)."""
    try:
        return json.loads((Path(workdir) / "records" / "teacher.json").read_text())["inputs"].get("teacher") or ""
    except (OSError, ValueError, KeyError):
        return ""


def mirror_of(workdir) -> Path:
    return ARTIFACTS / Path(workdir).name


def save(workdir) -> int:
    """Copy the work dir's kept files that changed into its mirror; returns how many were copied.

    The teacher's backup is rewritten after every epoch while it trains, so a copy taken meanwhile is
    checked: the epoch recorded in its metadata must be the same before and after (else copy again).
    """
    workdir, mirror = Path(workdir), mirror_of(workdir)
    for _ in range(5):
        before = _backup_epoch(workdir)
        copied = 0
        for path in kept_files(workdir):
            target = mirror / path.relative_to(workdir)
            if path.name in WEIGHTS_ONLY:
                if not target.exists() or os.path.getmtime(target) != os.path.getmtime(path):
                    _save_weights_only(path, target)
                    copied += 1
            else:
                copied += _mirror_file(path, target)
        if _backup_epoch(workdir) == before:
            break
        time.sleep(2)
    # A finished teacher stage deletes its backup: drop the mirror's stale copy too.
    if not (workdir / "teacher_backup").exists() and (mirror / "teacher_backup").exists():
        shutil.rmtree(mirror / "teacher_backup")
    if not (workdir / "teacher_best.keras").exists():
        (mirror / "teacher_best.keras").unlink(missing_ok=True)
    return copied


def _mirror_file(path: Path, target: Path) -> int:
    """Copy ``path`` to ``target`` (gzipped to ``target.gz`` when it is a large JSON file) unless the mirror holds
    it already; the other form is removed so one version stands. Returns 1 when something was written."""
    data = path.read_bytes()
    if path.suffix == ".json" and len(data) > GZIPPED_ABOVE:
        target, stale, data = target.with_name(target.name + ".gz"), target, gzip.compress(data, mtime=0)
    else:
        stale = target.with_name(target.name + ".gz")
    stale.unlink(missing_ok=True)
    if target.exists() and target.read_bytes() == data:
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return 1


def read_json(folder: Path, name: str):
    """A kept JSON file from a work dir or a mirror, plain or gzipped; None when neither exists."""
    path = Path(folder) / name
    if path.exists():
        return json.loads(path.read_text())
    if path.with_name(name + ".gz").exists():
        return json.loads(gzip.decompress(path.with_name(name + ".gz").read_bytes()))
    return None


def restore(workdir) -> int:
    """Copy the mirror's files into the work dir where it lacks them; returns how many were copied."""
    workdir, mirror = Path(workdir), mirror_of(workdir)
    copied = 0
    for path in kept_files(mirror):
        target = workdir / path.relative_to(mirror)
        zipped = path.name.endswith(".json.gz")
        if zipped:
            target = target.with_name(target.name[: -len(".gz")])
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if zipped:
                target.write_bytes(gzip.decompress(path.read_bytes()))
            else:
                shutil.copy2(path, target)
            copied += 1
    if copied:
        print(f"restored {copied} files of {workdir} from {mirror}", flush=True)
    return copied


def _backup_epoch(workdir: Path):
    try:
        return json.loads((workdir / "teacher_backup" / "training_metadata.json").read_text()).get("epoch")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "restore"):
        sys.exit("usage: python benchmarks/artifacts.py save|restore WORKDIR")
    n = (save if sys.argv[1] == "save" else restore)(sys.argv[2])
    print(f"{sys.argv[1]}: {n} files ({mirror_of(sys.argv[2])})")
