"""A study's table of rows (``benchmarks/results/<name>.json``): cached row by row under the study's settings, guarded
against rows computed on other images; and the machine and library a sitting ran on."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
from pathlib import Path

import results_io
from mskd_cifar_rows import Row, described, kd_overrides, row_key, row_of


def machine() -> dict:
    import mskd_tf
    from mskd_tf import report

    repo = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {**results_io.machine(), **report.versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            # mskd_cifar.sh runs a snapshot of one commit's library; otherwise the working tree's.
            "git_commit": os.environ.get("MSKD_LIBRARY_COMMIT") or git("rev-parse", "--short", "HEAD"),
            "library_dirty": bool(git("status", "--porcelain", "mskd_tf")) and not os.environ.get("MSKD_LIBRARY_COMMIT"),
            "library_path": str(Path(mskd_tf.__file__).parent)}


class Results:
    """The rows, written through results_io after each one, so a rerun resumes at the next."""

    def __init__(self, name: str, s: dict, max_rows: int = 0):
        self.name, self.s, self.max_rows = name, s, max_rows
        path = results_io.RESULTS / f"{name}.json"
        # Rows of another capacity pool or KD rate carry it in their names, so the table stays valid when it changes.
        key = {k: v for k, v in s.items() if k not in ("seeds", "other_targets", "min_params_ratio",
                                                       "capacity_reference", "kd_lr")}
        old = json.loads(path.read_text()).get("figures", {}) if path.exists() else {}
        if portable({"width": 1.0, **old.get("settings_key", {})}) == portable(key):  # before --width: width 1
            self.data = {**old, "settings_key": key, "rows": described(old["rows"], s)}
        else:
            self.data = {"settings_key": key, "rows": {}, "targets": {}}
        # A KD row's name carries its learning rate unless it is the default KD rate, which was finetune_lr until
        # the library's Config.kd_lr_scale (rows named then say [lr=<finetune_lr>] now) and is s["kd_lr"] since.
        named_default = self.data.get("kd_lr_default", s["finetune_lr"])
        if named_default != s["kd_lr"]:
            renamed = {}
            for record in self.data["rows"].values():
                row = row_of(record)
                if row.kind != "student" or row.loss == "kd":  # select+ce: the rate of its selection
                    row = dataclasses.replace(row, settings=kd_overrides(s, **{"lr": named_default,
                                                                               **dict(row.settings)}))
                renamed[row_key(row, s)] = {**record, "row": dataclasses.asdict(row)}
            self.data["rows"] = renamed
        self.data["kd_lr_default"] = s["kd_lr"]
        self.data["settings"] = s
        self.new_rows = 0

    def row(self, row: Row):
        """The row's cached record, or None."""
        return self.data["rows"].get(row_key(row, self.s))

    def put(self, row: Row, record: dict, *, finished: bool = True):
        """Cache the row's record; ``finished=False``: more of the row follows (not counted for --max_rows)."""
        self.data["rows"][row_key(row, self.s)] = {**record, "row": dataclasses.asdict(row)}
        self.save()
        if not finished:
            return
        self.new_rows += 1
        if self.max_rows and self.new_rows >= self.max_rows:
            print(f"--max_rows={self.max_rows} reached; rerun to continue", flush=True)
            raise SystemExit(0)

    def save(self):
        results_io.write_results(self.name, self.data)


def portable(key: dict) -> dict:
    """A table's settings key without where the checkout stands: the dataset's archive by file name, so a clone
    elsewhere (another ../shared) keeps the table's rows instead of starting it over."""
    source, _, location = str(key.get("dataset", "")).partition(":")
    return {**key, "dataset": f"{source}:{Path(location).name}"} if location else key


def guard_the_images(res, s, fingerprint: str):
    """Refuse to add rows computed on other images than the table's: the row digests cover the teacher and the kept
    channels, not the images each sitting loads afresh. A table recorded before this check takes this sitting's."""
    from mskd_tf.data_sources import cache_dir

    recorded = res.data.setdefault("data_fingerprint", fingerprint)
    if recorded != fingerprint:
        raise SystemExit(
            f"error: {s['dataset']} decodes to other images (data fingerprint {fingerprint}) than the "
            f"{len(res.data.get('rows', {}))} rows of {results_io.RESULTS / (s['name'] + '.json')} were computed on "
            f"({recorded}). Restore those images (an archive's copy extracted under {cache_dir()} can be deleted to "
            "extract it afresh), or use another --name.")
