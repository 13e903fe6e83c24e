"""The multi-worker file rendezvous (mskd_tf.multiworker) in one process: peers are simulated by heartbeat files.

Every wait must end: a missing worker, a stopped heartbeat, a file that never comes, a
failed chief and workers given different TF_CONFIG clusters or flags all raise an error
naming the worker or the file, within the stated time.
"""

import json
import threading
import time

import pytest

from mskd_tf import multiworker
from mskd_tf.config import Config
from mskd_tf.errors import MskdError

CLUSTER = {"worker": ["127.0.0.1:1111", "127.0.0.1:2222"]}


def _cluster(monkeypatch, tmp_path, index, *, timeout=3.0, stale=1.5, cluster=CLUSTER, digest="same"):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
    return multiworker.Cluster(tmp_path, digest, timeout=timeout, stale=stale)


class FakePeer:
    """Writes another worker's heartbeat file the way Cluster.start does, until stopped (or frozen)."""

    def __init__(self, folder, task, *, cluster=CLUSTER, digest="same", token="cafe"):
        self.path = folder / multiworker.FOLDER / f"heartbeat-{task}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.payload = {"task": task, "host": "h", "pid": 1, "count": 0, "cluster": cluster, "settings": digest,
                        "token": token, "stage": "teacher"}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.payload["count"] += 1
            self.path.write_text(json.dumps(self.payload))
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_a_worker_that_never_starts_is_named_after_the_timeout(monkeypatch, tmp_path):
    me = _cluster(monkeypatch, tmp_path, 0, timeout=1.0)
    me.start()
    try:
        began = time.monotonic()
        with pytest.raises(MskdError, match=r"worker-1 did not start within --worker_timeout=1 s .*127\.0\.0\.1:2222"):
            me.rendezvous()
        assert time.monotonic() - began < 5
    finally:
        me.stop()


def test_rendezvous_takes_the_chiefs_token_and_checks_cluster_and_flags(monkeypatch, tmp_path):
    worker = _cluster(monkeypatch, tmp_path, 1)
    with FakePeer(tmp_path, "worker-0", token="feed"):
        worker.rendezvous()
    assert worker.token == "feed" and not worker.is_chief

    other = {"worker": ["127.0.0.1:1111", "127.0.0.1:2223"]}  # a typo in one worker's TF_CONFIG
    with FakePeer(tmp_path, "worker-0", cluster=other):
        with pytest.raises(MskdError, match="TF_CONFIG differs between workers: worker-1 has the cluster"):
            _cluster(monkeypatch, tmp_path, 1).rendezvous()
    with FakePeer(tmp_path, "worker-0", digest="other"):
        with pytest.raises(MskdError, match="worker-0 runs with other flags than worker-1"):
            _cluster(monkeypatch, tmp_path, 1).rendezvous()


def test_a_stale_heartbeat_file_from_an_earlier_run_is_not_a_live_worker(monkeypatch, tmp_path):
    with FakePeer(tmp_path, "worker-0"):
        time.sleep(0.3)
    # The file exists but no longer changes: the worker must not start against it.
    with pytest.raises(MskdError, match="worker-0 did not start"):
        _cluster(monkeypatch, tmp_path, 1, timeout=1.0).rendezvous()


def test_waiting_for_the_chief_ends_when_its_heartbeat_stops(monkeypatch, tmp_path):
    worker = _cluster(monkeypatch, tmp_path, 1, timeout=30.0, stale=1.0)
    with FakePeer(tmp_path, "worker-0"):
        worker.rendezvous()
    began = time.monotonic()
    with pytest.raises(MskdError, match=r"worker-0 \(last seen in teacher on h, pid 1\) stopped: its heartbeat .*"
                                        r"heartbeat-worker-0\.json has not changed"):
        worker.wait("done-rank", "the rank stage's artifacts")
    assert time.monotonic() - began < 5  # the stale limit, not the 30 s timeout


def test_waiting_for_a_file_that_never_comes_times_out_naming_it(monkeypatch, tmp_path):
    worker = _cluster(monkeypatch, tmp_path, 1, timeout=1.5, stale=30.0)
    with FakePeer(tmp_path, "worker-0", token="beef"):
        worker.rendezvous()
        with pytest.raises(MskdError, match=r"waited --worker_timeout=1.5 s for rankings.json from the chief "
                                            r"\(worker-0, 127.0.0.1:1111\): .*run-beef/done-rank\.json did not appear"):
            worker.wait("done-rank", "rankings.json")


def test_announcements_reach_the_worker_and_a_failed_chief_is_reported(monkeypatch, tmp_path):
    chief = _cluster(monkeypatch, tmp_path, 0)
    chief.folder.mkdir(parents=True)
    worker = _cluster(monkeypatch, tmp_path, 1)
    worker.token = chief.token
    chief.announce("plan-rank", {"run": True})
    assert worker.wait("plan-rank", "a decision") == {"run": True}
    worker.announce("plan-select", {"run": False})  # only the chief announces
    assert not (chief.folder / f"run-{chief.token}" / "plan-select.json").exists()
    chief.announce_failure("--protect=x: no such layer")
    with pytest.raises(MskdError, match=r"the chief \(worker-0\) failed in start-up: --protect=x: no such layer"):
        worker.wait("done-rank", "rankings.json")


def test_the_chief_is_the_chief_task_else_worker_0(monkeypatch, tmp_path):
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    cluster = _cluster(monkeypatch, tmp_path, 0, cluster=with_chief)
    assert (cluster.members, cluster.chief, cluster.is_chief) == (["chief-0", "worker-0", "worker-1"], "chief-0", False)


def test_parallel_selection_needs_multi_worker():
    with pytest.raises(MskdError, match="--parallel_selection=True: .*set --strategy=multi_worker"):
        Config(parallel_selection=True).validate()
    Config(parallel_selection=True, strategy="multi_worker").validate()
    with pytest.raises(MskdError, match="--worker_timeout=0"):
        Config(worker_timeout=0).validate()


def test_lost_worker_error_names_the_task(monkeypatch, tmp_path):
    chief = _cluster(monkeypatch, tmp_path, 0)
    text = ("Collective ops is aborted by: The following tasks are unhealthy (stopped sending heartbeats):\n"
            "/job:worker/replica:0/task:1\nThe tasks have crashed.")
    error = str(multiworker.lost_worker_error(RuntimeError(text), "teacher", chief))
    assert "during the teacher stage (worker-1 (127.0.0.1:2222); TensorFlow: Collective ops is aborted" in error
    assert "rerun the same command on every worker" in error
    # TF does not always say who: then every other member is a suspect (here the one other worker).
    error = str(multiworker.lost_worker_error(RuntimeError("recvmsg:Connection reset by peer"), "select", chief))
    assert "during the select stage (worker-1 (127.0.0.1:2222); TensorFlow: recvmsg:Connection reset" in error
