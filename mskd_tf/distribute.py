"""tf.distribute strategies by name, with the machine-specific set-up done once.

Selection (candidate fine-tuning) and distillation build their models and
optimizers under ``make_strategy(name).scope()``. On a CPU-only machine the
``mirrored`` strategy is still exercised for real: it splits the one CPU into
``num_replicas`` logical devices, which TF only allows before its runtime has
started, so the error for "too late" says how to fix it.
"""

from __future__ import annotations

import json
import os
import re
import socket

import tensorflow as tf

from mskd_tf.config import STRATEGIES  # the --strategy choices
from mskd_tf.errors import MskdError


def make_strategy(name: str = "default", num_replicas: int = 2, *, tpu: str = "") -> tf.distribute.Strategy:
    """Return the ``tf.distribute.Strategy`` called ``name``.

    - ``default``: the current (no-op) strategy, ``tf.distribute.get_strategy()``.
    - ``one_device``: the first GPU, else ``/cpu:0``.
    - ``mirrored``: all GPUs; with no GPU, ``num_replicas`` logical CPU devices
      (must be called before TensorFlow runs its first op).
    - ``multi_worker``: ``MultiWorkerMirroredStrategy`` configured by ``TF_CONFIG``.
    - ``tpu``: a TPU found by ``TPUClusterResolver(tpu)`` (``tpu`` is a name or
      ``grpc://`` address; empty means the environment's default).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_physical_devices("GPU")
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        return _mirrored(num_replicas)
    if name == "multi_worker":
        read_tf_config()
        # One per process: TF configures its collectives once, at the first one's creation.
        if _MULTI_WORKER.get("strategy") is None:
            _MULTI_WORKER["strategy"] = tf.distribute.MultiWorkerMirroredStrategy()
        return _MULTI_WORKER["strategy"]
    if name == "tpu":
        return _tpu(tpu)
    raise MskdError(f"strategy={name!r} is unknown; use one of {', '.join(STRATEGIES)}.")


_MULTI_WORKER = {}


def read_tf_config() -> dict:
    """``TF_CONFIG`` parsed and checked; a clear error when it is missing or malformed."""
    return _read_tf_config(required=True)


def _mirrored(num_replicas: int) -> tf.distribute.MirroredStrategy:
    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise MskdError(f"num_replicas={num_replicas!r} must be a positive integer.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)]
        )
    except RuntimeError:
        # The runtime already started; fine only if it was split the same way before.
        logical = tf.config.list_logical_devices("CPU")
        if len(logical) < num_replicas:
            raise MskdError(
                f"strategy='mirrored' needs {num_replicas} logical CPU devices but TensorFlow was "
                f"already initialised with {len(logical)}. Create the strategy (pass --strategy / "
                "strategy=) before any TensorFlow op runs, i.e. first thing in a fresh process."
            ) from None
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:num_replicas]]
    return tf.distribute.MirroredStrategy(devices)


def _read_tf_config(required: bool) -> dict | None:
    """Parse ``TF_CONFIG``; None when absent and not required."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        if required:
            raise MskdError(
                "strategy='multi_worker' needs the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}); it is not set.'
            )
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        workers = [addr for role in cluster.values() for addr in role]
        if not workers or task["type"] not in cluster or not 0 <= int(task["index"]) < len(cluster[task["type"]]):
            raise ValueError("task does not name a member of the cluster")
        bad = [addr for addr in workers if not (isinstance(addr, str) and re.fullmatch(r"\S+:\d+", addr))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a host:port address")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        why = f"no {err} key" if isinstance(err, KeyError) else str(err)
        raise MskdError(
            f"TF_CONFIG is malformed ({why}); it must be JSON with a 'cluster' of role -> "
            "[host:port, ...] and a 'task' {'type': role, 'index': i} naming one of them."
        ) from None
    return config


def _tpu(address: str) -> tf.distribute.TPUStrategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address or None)
        if not resolver.master():
            raise ValueError("the resolver found no TPU master")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as err:
        raise MskdError(
            f"strategy='tpu': no TPU is reachable ({err}). Run on a TPU VM, set TPU_NAME or pass "
            "the TPU address, or choose another strategy (default, one_device, mirrored)."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def task_name() -> str:
    """``worker-1``, ``chief-0``...: this process's task in ``TF_CONFIG``; ``""`` when there is none."""
    config = _read_tf_config(required=False)
    if config is None:
        return ""
    return f"{config['task']['type']}-{int(config['task']['index'])}"


def cluster_members(cluster: dict) -> list[tuple[str, int]]:
    """The chief and worker tasks of a ``TF_CONFIG`` cluster, chief first: the order workers are ranked in
    (the pipeline's rendezvous and candidate-parallel selection's shares both follow it)."""
    return [(role, i) for role in ("chief", "worker") for i in range(len(cluster.get(role, [])))]


def worker_rank() -> tuple[int, int]:
    """(this task's rank, number of tasks) among the chief and workers of ``TF_CONFIG``; (0, 1) without it."""
    config = _read_tf_config(required=False)
    if config is None or not config["cluster"]:
        return 0, 1
    members = cluster_members(config["cluster"])
    me = (config["task"]["type"], int(config["task"]["index"]))
    if me not in members:
        raise MskdError(f"TF_CONFIG: task {me[0]}:{me[1]} is not a chief or worker of the cluster {config['cluster']}; "
                        "candidate-parallel selection runs on chief and worker tasks.")
    return members.index(me), len(members)


def is_chief() -> bool:
    """True on the process that should write artifacts.

    That is: no ``TF_CONFIG`` (single process), the ``chief`` task, or worker 0
    of a cluster that has no chief.
    """
    config = _read_tf_config(required=False)
    if config is None:
        return True
    task_type, index = config["task"]["type"], int(config["task"]["index"])
    if task_type == "chief":
        return True
    return task_type == "worker" and index == 0 and "chief" not in config["cluster"]


def local_cluster(count: int) -> dict:
    """A ``TF_CONFIG`` cluster of ``count`` workers on free ports of 127.0.0.1, for trying
    ``--strategy=multi_worker`` on one machine (tests, benchmarks): ``{"worker": ["127.0.0.1:PORT", ...]}``.
    Give worker ``i`` ``{"cluster": <this>, "task": {"type": "worker", "index": i}}``."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # all bound at once, so the ports differ
            s.bind(("127.0.0.1", 0))
        return {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]}
    finally:
        for s in sockets:
            s.close()


def chief_values(strategy, values):
    """``values`` (floats) as the chief computed them, on every worker of a multi-worker strategy.

    Lock-step training needs every worker to take the same decisions (which candidates a rung keeps),
    but a score computed outside the strategy (a BatchNorm recalibration on this worker's batches, a
    local evaluation) can differ between workers by a shuffle or a rounding, and the next collective
    then mixes two different models. One all-reduce in which only replica 0 (on the chief) contributes
    hands everyone the chief's exact numbers (float64: a Python float survives it unchanged).
    Without a multi-worker strategy the values come back as they are.
    """
    values = [float(v) for v in values]
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or not values:
        return values

    def from_replica_zero():
        first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        return tf.where(first, tf.constant(values, tf.float64), tf.zeros(len(values), tf.float64))

    summed = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(from_replica_zero), axis=None)
    return [float(v) for v in summed.numpy()]
