"""The work directory: atomic artifacts and which stage made them with which config.

Every artifact is written to a temporary name and renamed into place, so a kill
at any moment leaves either the old artifact or the new one, never half a file.
``stages.json`` records, per finished stage, the digest of the config fields
the stage depends on (chained with the previous stage's digest) and its
seconds; a stage is *done* when its artifacts exist, load, and its digest
matches the current config.

Each finished stage's record is also kept in its own file, ``records/<stage>.json``, written
after the stage's artifacts and removed before the stage is redone. ``stages.json`` is the
one file every stage rewrites, so it is the one most exposed to damage (an editor, a copy
cut short, a full disk). When it cannot be read it is moved aside to ``stages.json.damaged``
with a warning and rebuilt from those per-stage records: a recovered stage is still reused
only when its digest matches the current config and its artifacts load, so hours of teacher
training survive a damaged record, and nothing unverified is trusted.

One run at a time: :meth:`Workdir.lock` takes an exclusive ``flock`` on ``.lock`` (the
holder's PID written inside) for the whole run. The OS drops the lock when its process dies,
so a lock file left by a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from mskd_tf.errors import MskdError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a fresh temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the suffix (Keras insists on ``.keras``) and does not exist yet,
    so writers create it with normal permissions. On any failure it is removed and ``path``
    keeps its old content.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=final.suffix or ".tmp", dir=final.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> str:
    """Write bytes or text to ``path`` atomically; returns ``str(path)``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


class Workdir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # A private probe name: several workers may open the same workdir at once.
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write_probe."):
                pass
        except OSError as exc:
            raise MskdError(f"--workdir={self.path}: cannot write there ({exc.strerror}); choose a writable folder.") from exc
        self._state_file = self.path / "stages.json"
        self._records = self.path / "records"
        self._state = None

    @property
    def state(self) -> dict:
        """The stage records, read on first use (so :meth:`lock` is taken before a damaged file is moved aside)."""
        if self._state is None:
            self._state = self._read_state()
        return self._state

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def _read_state(self) -> dict:
        if not self._state_file.exists():
            return {}
        try:
            state = json.loads(self._state_file.read_text())
            if isinstance(state, dict) and all(isinstance(r, dict) for r in state.values()):
                return state
            problem = "it does not hold one record per stage"
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            problem = str(exc)
        return self._recover_state(problem)

    def _recover_state(self, problem: str) -> dict:
        """Move the unreadable stages.json aside and rebuild it from records/<stage>.json (verified later)."""
        damaged = self.path / "stages.json.damaged"
        os.replace(self._state_file, damaged)
        state = {}
        for path in sorted(self._records.glob("*.json")) if self._records.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            if isinstance(record, dict) and isinstance(record.get("digest"), str):
                state[path.stem] = record
        kept = (f"recovered the records of {', '.join(state)} from records/; each is reused only if its config "
                "digest matches and its artifacts load" if state else
                "no per-stage records to recover from, so every stage runs again")
        print(f"WARNING: {self._state_file} is unreadable ({problem}); moved it to {damaged.name}; {kept}.", flush=True)
        self._state = state
        if state:
            self._flush()
        return state

    @contextlib.contextmanager
    def lock(self, name: str = ".lock"):
        """Hold an exclusive lock on this workdir for the block; fail at once if another run holds it.

        Two runs interleaving their stages in one workdir would leave artifacts that match neither.
        ``flock`` is released by the OS when the holder dies, so a stale lock file never blocks.
        """
        path = self.path / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise MskdError(
                    f"--workdir={self.path} is in use by another mskd-tf run (pid {holder}); wait for it to finish, "
                    "or choose another --workdir. Two runs in one workdir would mix their artifacts."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # the PID would be a stale name once released
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ atomic writes

    def atomic(self, name: str):
        """:func:`atomic_path` for an artifact of this workdir."""
        return atomic_path(self.path / name)

    def check_data(self, inputs: dict, fingerprint: str, counts: dict, *, write: bool = True):
        """Refuse data that differs from what this work dir's stages were computed on under the same data flags.

        ``data.json`` keeps the flags that define the data (``inputs``), the images' ``fingerprint`` and the
        split sizes. Other flags: new data on purpose (the stages' digests decide what reruns), recorded anew.
        The same flags reading other images (an archive extracted only in part, files edited or replaced) would
        resume finished stages on data they never saw: one error, before anything runs."""
        path = self.path / "data.json"
        recorded = json.loads(path.read_text()) if path.exists() else None
        if recorded and recorded.get("inputs") == inputs and recorded.get("fingerprint") != fingerprint:
            then = " / ".join(f"{recorded['counts'].get(k)} {k}" for k in counts)
            now = " / ".join(f"{v} {k}" for k, v in counts.items())
            raise MskdError(
                f"--dataset={inputs['dataset']}: reads other images than this work dir's stages were computed on "
                f"({now} images now, {then} then; {path}). Restore that data (a partly extracted archive or "
                "edited files?), or use a new --workdir to start over on this data.")
        if write and recorded != {"inputs": inputs, "fingerprint": fingerprint, "counts": counts}:
            self.write_json("data.json", {"inputs": inputs, "fingerprint": fingerprint, "counts": counts})

    def write_json(self, name: str, payload) -> Path:
        with self.atomic(name) as tmp:
            tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable))
        return self.path / name

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    def save_model(self, model, name: str) -> Path:
        with self.atomic(name) as tmp:
            model.save(tmp)
        return self.path / name

    # ------------------------------------------------------------------ stage bookkeeping

    def stage_status(self, stage: str, digest: str, inputs: dict, artifacts: list[str],
                     shown: dict | None = None) -> tuple[bool, str]:
        """(done, why-not) for a stage given its current digest, inputs and artifact names; ``shown`` maps a
        recorded setting name to the name a message gives it."""
        record = self.state.get(stage)
        missing = [a for a in artifacts if not (self.path / a).exists()]
        if record is None and not missing:
            return False, "artifacts exist but were not recorded as finished"
        if record is None:
            return False, "not run yet"
        if missing:
            return False, f"artifact {missing[0]} is missing"
        if record.get("digest") != digest:
            before = record.get("inputs", {})
            changed = sorted((shown or {}).get(k, k) for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
            return False, "config changed since it ran (" + (", ".join(changed) or "an earlier stage changed") + ")"
        return True, ""

    def mark_done(self, stage: str, digest: str, inputs: dict, seconds: float):
        self.state[stage] = {"digest": digest, "inputs": inputs, "seconds": round(seconds, 3), "finished": time.time()}
        self.write_json(f"records/{stage}.json", self.state[stage])  # the copy a damaged stages.json is rebuilt from
        self._flush()

    def adopt(self, stage: str, record: dict):
        """Record ``stage`` as finished with another work dir's record (its files copied here first)."""
        self.state[stage] = dict(record)
        self.write_json(f"records/{stage}.json", self.state[stage])
        self._flush()

    def forget(self, stage: str):
        (self._records / f"{stage}.json").unlink(missing_ok=True)
        if self.state.pop(stage, None) is not None:
            self._flush()

    def _flush(self):
        with self.atomic("stages.json") as tmp:
            tmp.write_text(json.dumps(self.state, indent=2, default=_jsonable))


def _jsonable(value):
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
