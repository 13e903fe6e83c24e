"""Strategies by name: error paths in-process, logical CPU devices in a fresh subprocess."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from mskd_tf.distribute import is_chief, make_strategy
from mskd_tf.errors import MskdError


def test_unknown_name_lists_the_choices():
    with pytest.raises(MskdError, match="strategy='nccl' is unknown; use one of default, one_device, mirrored"):
        make_strategy("nccl")


def test_default_and_one_device():
    assert make_strategy("default") is tf.distribute.get_strategy()
    one = make_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    assert one.num_replicas_in_sync == 1


def test_multi_worker_without_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(MskdError, match="needs the TF_CONFIG environment variable"):
        make_strategy("multi_worker")


@pytest.mark.parametrize(
    "raw",
    ["{not json", json.dumps({"cluster": {}}), json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}})],
)
def test_multi_worker_malformed_tf_config(monkeypatch, raw):
    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(MskdError, match="TF_CONFIG is malformed"):
        make_strategy("multi_worker")


def test_tpu_unreachable_fails_fast(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(MskdError, match="strategy='tpu': no TPU is reachable"):
        make_strategy("tpu")


def test_mirrored_too_late_in_an_initialised_runtime():
    tf.constant(1.0) + 1.0  # starts the runtime with one CPU device
    if len(tf.config.list_logical_devices("CPU")) >= 3:
        pytest.skip("this process already has 3 logical CPUs")
    with pytest.raises(MskdError, match="before any TensorFlow op runs"):
        make_strategy("mirrored", num_replicas=3)


def test_mirrored_rejects_bad_replica_count():
    with pytest.raises(MskdError, match="num_replicas=0 must be a positive integer"):
        make_strategy("mirrored", num_replicas=0)


@pytest.mark.parametrize(
    "cluster, task, chief",
    [
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
    ],
)
def test_is_chief(monkeypatch, cluster, task, chief):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert is_chief() is chief
    monkeypatch.delenv("TF_CONFIG")
    assert is_chief() is True


def test_mirrored_on_logical_cpus_in_fresh_process():
    script = textwrap.dedent(
        """
        from mskd_tf.distribute import make_strategy
        import tensorflow as tf
        strategy = make_strategy("mirrored", num_replicas=2)
        again = make_strategy("mirrored", num_replicas=2)  # reuses the existing split
        per_replica = strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
        ids = sorted(int(t) for t in strategy.experimental_local_results(per_replica))
        print("RESULT", strategy.num_replicas_in_sync, again.num_replicas_in_sync, ids)
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RESULT 2 2 [0, 1]" in out.stdout
