"""The quickstart pipeline in one process vs two local worker processes (--strategy=multi_worker), and the
all-reduce traffic a training step needs, so a user can size a cluster.

On one 2-core machine two workers share the same two cores, so the wall-time figure is the *overhead* of
multi-worker training (collectives over gRPC on 127.0.0.1, two TF runtimes, half-size per-replica batches,
file barriers), not a speed-up. Each run gets a fresh workdir; per-stage seconds come from its stages.json.
The traffic figure is arithmetic: every step all-reduces one gradient per trainable weight (float32, 4 bytes);
a ring all-reduce sends and receives 2 (N - 1) / N of that per worker.

  python benchmarks/multiworker_overhead.py                       # the quickstart as shipped
  python benchmarks/multiworker_overhead.py --extra=--train_subset=4096 --extra=--teacher_epochs=1   # shrunk

Writes benchmarks/results/multiworker_overhead.json, including the machine load seen during the runs
(other processes using the CPU make the wall times longer and noisier: the figures say so).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results

from mskd_tf.distribute import local_cluster

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")


def _other_cpu_users(own: set) -> list:
    """Processes other than ours using over half a core right now (ps's lifetime average; a rough signal)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--no-headers"], check=False, capture_output=True, text=True).stdout
    busy = []
    for line in out.splitlines():
        pid, cpu, args = line.split(None, 2)
        if int(pid) not in own and float(cpu) > 50:
            busy.append(f"{args[:80]} ({cpu}% CPU)")
    return busy


class LoadWatch:
    """Samples the 1-minute load average while a run goes on."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(5):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(workers: int, flags: list, workdir: Path) -> dict:
    command = [sys.executable, "-m", "mskd_tf.run", f"--flagfile={REPO / 'configs' / 'quickstart.cfg'}", *flags,
               f"--workdir={workdir}"]
    began = time.perf_counter()
    with LoadWatch() as load:
        if workers == 1:
            processes = [subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True)]
        else:
            cluster = local_cluster(workers)
            processes = [subprocess.Popen(command + ["--strategy=multi_worker"], cwd=REPO, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True,
                                          env=dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster,
                                                                              "task": {"type": "worker", "index": i}})))
                         for i in range(workers)]
        others = _other_cpu_users({os.getpid(), *(p.pid for p in processes)})
        for process in processes:
            _, stderr = process.communicate()
            if process.returncode:
                raise SystemExit(f"{workers}-worker run failed:\n{stderr[-3000:]}")
    seconds = time.perf_counter() - began
    stages = json.loads((workdir / "stages.json").read_text())
    distill = json.loads((workdir / "distill.json").read_text())
    return {"workers": workers, "wall_seconds": round(seconds, 1),
            "stage_seconds": {name: record["seconds"] for name, record in stages.items()},
            "student_test_acc": distill["test_acc"], "distill_steps": distill["distill_steps"],
            "load_average_1min": {"mean": round(sum(load.samples) / max(1, len(load.samples)), 2),
                                  "max": round(max(load.samples, default=0.0), 2)},
            "other_busy_processes": others}


def traffic(name: str, input_shape, classes: int, step_seconds: float | None = None, **kwargs) -> dict:
    from mskd_tf import models

    model = models.build(name, input_shape, classes, **kwargs)
    weights = sum(int(v.numpy().size) for v in model.trainable_variables)
    batchnorm = [layer for layer in model.layers if layer.__class__.__name__ == "BatchNormalization"]
    gradient_bytes = 4 * weights
    row = {"model": name, **kwargs, "trainable_params": weights, "gradient_bytes_per_step": gradient_bytes,
           "ring_bytes_per_worker_per_step": {n: round(2 * (n - 1) / n * gradient_bytes) for n in (2, 4, 8)},
           # synchronized BatchNorm (selection) also all-reduces each layer's batch mean and variance
           "sync_batchnorm_bytes_per_step": 4 * 2 * sum(int(layer.gamma.shape[0]) for layer in batchnorm)}
    if step_seconds:
        row["megabits_per_second_per_worker_at"] = {
            f"{step_seconds:g} s/step": {n: round(8 * b / step_seconds / 1e6, 1)
                                         for n, b in row["ring_bytes_per_worker_per_step"].items()}}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra", action="append", default=[], help="a flag for both runs (repeatable)")
    parser.add_argument("--skip_runs", action="store_true", help="only the traffic arithmetic")
    args = parser.parse_args()
    figures = {"flags": ["--flagfile=configs/quickstart.cfg", *args.extra], "runs": []}
    if not args.skip_runs:
        with tempfile.TemporaryDirectory(prefix="mskd_mw_bench-") as tmp:
            for workers in (1, 2):
                row = run(workers, args.extra, Path(tmp) / f"workers{workers}")
                print(json.dumps(row), flush=True)
                figures["runs"].append(row)
        one, two = figures["runs"]
        figures["overhead"] = {"wall_ratio_2_vs_1": round(two["wall_seconds"] / one["wall_seconds"], 2),
                               "per_stage_ratio_2_vs_1": {s: round(two["stage_seconds"][s] / max(1e-9, v), 2)
                                                          for s, v in one["stage_seconds"].items()}}
        figures["machine_shared"] = bool(one["other_busy_processes"] or two["other_busy_processes"])
    # 0.38 s/step: ResNet-20 at batch 128 and ~340 images/s, this 2-core host's teacher speed (BENCHMARKS.md)
    figures["traffic"] = [traffic("resnet20", (32, 32, 3), 10, step_seconds=0.38), traffic("small_cnn", (28, 28, 1), 10, width=0.5)]  # the quickstart's teacher
    print(json.dumps(figures, indent=1))
    write_results("multiworker_overhead", figures)


if __name__ == "__main__":
    main()
