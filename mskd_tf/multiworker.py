"""Running the pipeline on several workers (``--strategy=multi_worker``): who does what, and when.

Every worker runs the same command with its own ``TF_CONFIG`` and one shared ``--workdir``.
Training stages (teacher, select, distill) train in lock-step under
``MultiWorkerMirroredStrategy``; the other stages run on the chief only and the workers
wait for the chief's record that the stage is done. The workers meet through files in
``<workdir>/multiworker/``, not through TensorFlow collectives, because a collective
whose peer has died hangs (or, at start-up, TF waits for a missing worker for an hour):

* ``heartbeat-<task>.json``: rewritten every second by a thread of each worker, with the
  cluster it was given, a digest of its settings and (on the chief) this run's token.
  A peer is alive while that file keeps changing; one that stops for
  :data:`STALE_SECONDS` is named in the error.
* Start-up (:meth:`Cluster.rendezvous`): every worker waits until every other one's
  heartbeat is fresh and checks that all were given the same cluster and the same
  flags, *before* TensorFlow's strategy starts (which would block on a missing worker).
* ``run-<token>/<name>.json``: the chief's announcements for this run (what it decided
  for each stage, that a stage is done, that it failed). The token is new each run, so
  a worker never mistakes an earlier run's file for this run's.

A worker that dies inside a training stage is reported by TensorFlow's coordination
service to the others (an ``UnavailableError`` naming its task, within about 10 s here),
which :func:`lost_worker_error` turns into a clear error. Rerunning the same command on
every worker resumes from the artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

from mskd_tf import distribute
from mskd_tf.errors import MskdError
from mskd_tf.workdir import write_atomic

FOLDER = "multiworker"
HEARTBEAT_SECONDS = 1.0
# A peer whose heartbeat file has not changed this long is taken for dead. Far above the
# heartbeat interval: a shared file system may show a write late, and a busy host may stall a thread.
STALE_SECONDS = 60.0
_POLL_SECONDS = 0.5
# Creating TF's multi-worker strategy holds the GIL while it waits for every worker to register, so
# our heartbeat thread stops beating inside it. A worker that left the rendezvous as soon as it saw
# the others could go quiet before they saw *it* change, and all would wait forever. So each worker
# keeps beating this long after it has seen everyone: several beats, far more than one poll.
RENDEZVOUS_GRACE_SECONDS = 5.0


def config_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Cluster:
    """This process's place in a ``TF_CONFIG`` cluster and the file rendezvous with the others."""

    def __init__(self, workdir, settings_digest: str, *, timeout: float, stale: float = STALE_SECONDS):
        config = distribute.read_tf_config()
        self.cluster = config["cluster"]
        self.me = distribute.task_name()
        # Chief first, then the workers: the order selection's candidate-parallel mode shares candidates in.
        self.members = [f"{role}-{i}" for role, i in distribute.cluster_members(self.cluster)]
        if self.me not in self.members:
            raise MskdError(f"TF_CONFIG: task {self.me} is not a chief or worker of the cluster {self.cluster}; "
                            "the pipeline runs on chief and worker tasks.")
        self.chief = self.members[0]
        self.is_chief = self.me == self.chief
        self.folder = Path(workdir) / FOLDER
        self.digest = settings_digest
        self.timeout, self.stale = float(timeout), float(stale)
        self.token = secrets.token_hex(8) if self.is_chief else None
        self.stage = "start-up"  # what this worker is doing, for errors and the heartbeat
        self._count = 0
        self._stop = threading.Event()
        self._thread = None
        self._seen = {}  # peer -> (last heartbeat count, monotonic time it changed)

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat_path(self, task: str) -> Path:
        return self.folder / f"heartbeat-{task}.json"

    def _beat(self):
        self._count += 1
        payload = {"task": self.me, "host": socket.gethostname(), "pid": os.getpid(), "count": self._count,
                   "cluster": self.cluster, "settings": self.digest, "token": self.token, "stage": self.stage}
        write_atomic(self._heartbeat_path(self.me), json.dumps(payload))

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()

        def beat_forever():
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    self._beat()
                except OSError:  # a full or flaky shared disk: the peers will report us if it lasts
                    pass

        self._thread = threading.Thread(target=beat_forever, name="mskd-heartbeat", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _read_heartbeat(self, task: str) -> dict | None:
        try:
            return json.loads(self._heartbeat_path(task).read_text())
        except (OSError, ValueError):
            return None  # not written yet, or caught mid-rename on a shared file system

    def _fresh(self, task: str) -> dict | None:
        """The peer's heartbeat if it has changed since we started watching it, else None."""
        beat = self._read_heartbeat(task)
        if beat is None:
            return None
        now = time.monotonic()
        last = self._seen.get(task)
        if last is None or last[0] != beat.get("count"):
            self._seen[task] = (beat.get("count"), now, last is not None)
        return beat if self._seen[task][2] else None

    def check_alive(self, tasks=None):
        """Raise naming a peer whose heartbeat stopped for ``stale`` seconds (a dead or hung worker)."""
        for task in tasks or [m for m in self.members if m != self.me]:
            beat = self._read_heartbeat(task)
            now = time.monotonic()
            last = self._seen.get(task)
            if beat is not None and (last is None or last[0] != beat.get("count")):
                self._seen[task] = (beat.get("count"), now, last is not None)
            elif last is not None and now - last[1] > self.stale:
                where = f" (last seen in {beat.get('stage')} on {beat.get('host')}, pid {beat.get('pid')})" if beat else ""
                raise MskdError(
                    f"multi_worker: {task}{where} stopped: its heartbeat {self._heartbeat_path(task)} has not changed "
                    f"for {now - last[1]:.0f} s while {self.me} waited in {self.stage}. Rerun the same command on "
                    "every worker; finished stages are kept.")

    def rendezvous(self):
        """Wait until every worker is up; check they were all given the same cluster and the same flags."""
        deadline = time.monotonic() + self.timeout
        peers = [m for m in self.members if m != self.me]
        while True:
            beats = {task: self._fresh(task) for task in peers}
            missing = [task for task, beat in beats.items() if beat is None]
            if not missing:
                time.sleep(RENDEZVOUS_GRACE_SECONDS)  # let the others see us beat (see RENDEZVOUS_GRACE_SECONDS)
                break
            if time.monotonic() > deadline:
                raise MskdError(
                    f"multi_worker: {', '.join(missing)} did not start within --worker_timeout={self.timeout:g} s "
                    f"(no fresh heartbeat in {self.folder}). Start the same command on every worker of TF_CONFIG "
                    f"({', '.join(f'{m} = {self.address(m)}' for m in self.members)}) with the same --workdir.")
            time.sleep(_POLL_SECONDS)
        for task, beat in beats.items():
            if beat["cluster"] != self.cluster:
                raise MskdError(f"TF_CONFIG differs between workers: {self.me} has the cluster {self.cluster}, "
                                f"{task} has {beat['cluster']}. Give every worker the same 'cluster' (only "
                                "'task' differs).")
            if beat["settings"] != self.digest:
                raise MskdError(f"multi_worker: {task} runs with other flags than {self.me} (settings digest "
                                f"{beat['settings']} vs {self.digest}); run the same command on every worker.")
        if not self.is_chief:
            self.token = beats[self.chief]["token"]
        else:  # earlier runs' announcements are stale now
            for old in self.folder.glob("run-*"):
                if old.name != f"run-{self.token}":
                    shutil.rmtree(old, ignore_errors=True)

    def address(self, task: str) -> str:
        role, index = task.rsplit("-", 1)
        return self.cluster[role][int(index)]

    # ------------------------------------------------------------------ the chief's announcements

    def _note(self, name: str) -> Path:
        return self.folder / f"run-{self.token}" / f"{name}.json"

    def announce(self, name: str, payload: dict | None = None):
        """The chief tells the workers ``name`` (a decision or a finished stage) for this run."""
        if self.is_chief:
            write_atomic(self._note(name), json.dumps(payload or {}))

    def wait(self, name: str, what: str) -> dict:
        """Block until the chief announces ``name``; ``what`` says what we wait for, for the error."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return json.loads(self._note(name).read_text())
            except (OSError, ValueError):
                pass
            failed = self._note("failed")
            if failed.exists():
                try:
                    message = json.loads(failed.read_text()).get("error", "")
                except (OSError, ValueError):
                    message = ""
                raise MskdError(f"multi_worker: the chief ({self.chief}) failed in {self.stage}: {message}")
            self.check_alive([self.chief])
            if time.monotonic() > deadline:
                raise MskdError(
                    f"multi_worker: {self.me} waited --worker_timeout={self.timeout:g} s for {what} from the chief "
                    f"({self.chief}, {self.address(self.chief)}): {self._note(name)} did not appear. Raise "
                    "--worker_timeout if the chief is still working, else rerun the same command on every worker.")
            time.sleep(_POLL_SECONDS)

    def announce_failure(self, message: str):
        if self.is_chief and self.token:
            try:
                self.announce("failed", {"error": message, "stage": self.stage})
            except OSError:
                pass


def lost_worker_error(exc: Exception, stage: str, cluster: Cluster | None = None) -> MskdError:
    """A clear error for TensorFlow's report that a peer of a collective step is gone.

    TF names the task in some reports (``/job:worker/replica:0/task:1 ... stopped sending heartbeats``)
    and not in others (``Connection reset by peer``): then every other member is named as a suspect.
    """
    text = str(exc)
    named = sorted({f"{job}-{task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text)})
    if cluster is not None:
        named = [t for t in named if t != cluster.me] or [t for t in cluster.members if t != cluster.me]
        who = ", ".join(f"{t} ({cluster.address(t)})" for t in named if t in cluster.members) or ", ".join(named)
    else:
        who = ", ".join(named)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return MskdError(f"multi_worker: a worker stopped during the {stage} stage ({who or 'unknown'}; TensorFlow: "
                     f"{first[:200]}). The other workers stop too; rerun the same command on every worker to resume "
                     "from the finished artifacts.")


@contextlib.contextmanager
def running(cluster: Cluster):
    """Heartbeats, the start-up rendezvous and the strategy, for the block; clear errors out of it."""
    import tensorflow as tf

    cluster.start()
    try:
        cluster.rendezvous()
        distribute.make_strategy("multi_worker")  # before any TensorFlow op of this process
        yield cluster
    except MskdError as exc:
        cluster.announce_failure(str(exc))
        raise
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError, tf.errors.InternalError) as exc:
        error = lost_worker_error(exc, cluster.stage, cluster)
        cluster.announce_failure(str(error))
        raise error from None
    except BaseException as exc:
        cluster.announce_failure(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        cluster.stop()
