"""Selection under real replicas and real worker processes (each in a fresh TF runtime).

* mirrored (2 logical CPUs) vs one_device: one fine-tuning step gives the same weights.
* multi_worker: two processes on 127.0.0.1 with their own TF_CONFIG train one candidate
  together; both end with identical weights and only the chief writes.
* parallel: two processes share four candidates through one workdir; the chief chooses.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mskd_tf.distribute import local_cluster

TESTS = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(TESTS, "multiworker_select.py")
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import sys
    from mskd_tf.distribute import make_strategy
    mirrored = make_strategy("mirrored", num_replicas=2)  # before any TF op
    import keras, numpy as np
    sys.path.insert(0, {tests!r})
    from multiworker_select import tiny_candidate, tiny_datasets
    from mskd_tf.selection import select
    # 2 steps an epoch, the same batches in both runs; a ragged validation batch
    train, val = tiny_datasets(n_train=64, n_val=37, batch=32, shuffle=False)
    for name, strategy in (("mirrored", mirrored), ("one_device", make_strategy("one_device"))):
        workdir = {workdir!r} + "/" + name
        payload = select({{"tiny": tiny_candidate(8, "tiny", seed=1)}}, train, val, workdir=workdir, epochs=0.5,
                         successive_halving=False, lr=0.1, strategy=strategy, verbose=False)
        weights = keras.models.load_model(workdir + "/selected.keras").get_weights()
        np.savez(workdir + ".npz", *weights)
        print("RESULT", name, strategy.num_replicas_in_sync, payload["candidates"][0]["steps"],
              payload["candidates"][0]["curve"])
    """
)


def test_one_step_under_mirrored_equals_one_device(tmp_path):
    script = MIRRORED_SCRIPT.format(tests=TESTS, workdir=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [line.split(maxsplit=4) for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert [(r[1], r[2], r[3]) for r in results] == [("mirrored", "2", "1"), ("one_device", "1", "1")]
    assert json.loads(results[0][4]) == json.loads(results[1][4])  # same validation accuracy, counted exactly
    mirrored, single = np.load(tmp_path / "mirrored.npz"), np.load(tmp_path / "one_device.npz")
    assert len(mirrored.files) == len(single.files) == 9  # conv1, BN (4), conv2 (2), logits (2)
    for key in mirrored.files:
        np.testing.assert_allclose(mirrored[key], single[key], atol=1e-5, err_msg=key)
    from multiworker_select import tiny_candidate

    initial = tiny_candidate(8, "tiny", seed=1).get_weights()
    assert not np.allclose(mirrored["arr_0"], initial[0])  # the step did move the weights


def run_workers(mode, workdirs, timeout=240):
    """Start one helper process per workdir as worker i of a local cluster; return their payloads."""
    cluster = local_cluster(len(workdirs))
    processes = []
    for index, workdir in enumerate(workdirs):
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen([sys.executable, HELPER, mode, str(workdir)], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    payloads = []
    try:
        for index, process in enumerate(processes):
            stdout, stderr = process.communicate(timeout=timeout)
            assert process.returncode == 0, f"worker {index}:\n{stderr[-3000:]}"
            line = next(line for line in stdout.splitlines() if line.startswith("PAYLOAD "))
            payloads.append(json.loads(line[len("PAYLOAD "):]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return payloads


@pytest.mark.slow  # two fresh TF runtimes in lock-step: ~45-70 s on this shared 2-core machine
def test_multi_worker_fine_tune_is_synchronous_and_only_the_chief_writes(tmp_path):
    import keras

    from mskd_tf.keras_utils import weights_digest

    # Separate workdirs make "who wrote what" visible; a real cluster shares one.
    chief, other = run_workers("sync", [tmp_path / "worker0", tmp_path / "worker1"])
    assert chief["protocol"]["replicas"] == other["protocol"]["replicas"] == 2
    assert chief["candidates"][0]["steps"] == 3
    assert chief["candidates"][0]["weights"] == other["candidates"][0]["weights"]  # bit-identical weights
    assert chief["candidates"][0]["curve"] == other["candidates"][0]["curve"]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["worker0/selected.keras", "worker0/selection.json", "worker0/selection/tiny.json",
                       "worker0/selection/tiny.keras"]
    selected = keras.models.load_model(tmp_path / "worker0" / "selected.keras")
    assert weights_digest(selected) == chief["candidates"][0]["weights"]


@pytest.mark.slow  # two fresh TF runtimes in lock-step: ~45-70 s on this shared 2-core machine
def test_lock_step_halving_keeps_the_same_candidates_on_every_worker(tmp_path):
    # Each worker recalibrates BatchNorm on differently shuffled batches; the rungs must still agree (they take
    # the chief's scores), else the next rung trains different candidates and the collectives fail.
    chief, other = run_workers("sync_halving", [tmp_path / "worker0", tmp_path / "worker1"])
    assert chief["protocol"]["rungs"] == other["protocol"]["rungs"]
    assert [len(r["candidates"]) for r in chief["protocol"]["rungs"]] == [3, 2]
    assert chief["selected"] == other["selected"]
    for mine, theirs in zip(chief["candidates"], other["candidates"]):
        assert mine["curve"] == theirs["curve"] and mine["weights"] == theirs["weights"], mine["criterion"]


@pytest.mark.slow  # two fresh TF runtimes: ~30 s on this shared 2-core machine
def test_candidate_parallel_workers_share_the_candidates(tmp_path):
    shared = tmp_path / "shared"
    chief, other = run_workers("parallel", [shared, shared])
    assert chief["selected"] == other["selected"] and chief["candidates"] == other["candidates"]
    assert chief["protocol"]["parallel_workers"] == 2
    on_disk = json.loads((shared / "selection.json").read_text())
    assert on_disk == chief
    records = {p.stem: json.loads(p.read_text()) for p in (shared / "selection").glob("*.json")}
    assert {name: r["worker"] for name, r in records.items()} == {"w4": 0, "w6": 1, "w8": 0, "w10": 1}
    first_rung = on_disk["protocol"]["rungs"][0]
    assert first_rung["candidates"] == ["w4", "w6", "w8", "w10"] and len(first_rung["kept"]) == 2
    assert all(records[n]["steps"] == 1 for n in first_rung["candidates"] if n not in first_rung["kept"])
    assert all(records[n]["steps"] == 2 for n in first_rung["kept"])
    assert on_disk["selected"]["criterion"] in first_rung["kept"]
    assert not list(Path(shared).glob(".*"))  # no temporary files left behind


@pytest.mark.slow  # two fresh TF runtimes: ~30 s on this shared 2-core machine
def test_candidate_parallel_workers_share_the_survivors_of_the_zero_cost_rung(tmp_path):
    shared = tmp_path / "shared"
    chief, other = run_workers("parallel_pooled", [shared, shared])
    assert chief == other and chief["protocol"]["zero_cost"]["kept"] == ["w4", "w8"]
    records = {p.stem: json.loads(p.read_text()) for p in (shared / "selection").glob("*.json")}
    assert {name: r["worker"] for name, r in records.items()} == {"w4": 0, "w8": 1}  # not both on worker 0


def test_multi_worker_distillation_trains_both_workers_in_lock_step(tmp_path):  # ~10-15 s
    chief, other = run_workers("distill", [tmp_path / "worker0", tmp_path / "worker1"])
    assert chief["weights"] == other["weights"]  # bit-identical students
    assert chief["history"] == other["history"]
    assert len(chief["history"]["loss"]) == 2 and "val_accuracy" in chief["history"]
    assert all(math.isfinite(v) for v in chief["history"]["distillation_loss"])
