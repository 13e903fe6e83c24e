"""Where the benchmark scripts write their figures: benchmarks/results/<name>.json,
stamped with the date, the command line, versions and the machine, so every
figure in BENCHMARKS.md can be traced to the run that printed it."""

import datetime
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# The CIFAR-10 image-folder archive beside the checkout (../shared/data, see its README).
SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def machine() -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version()}


def write_results(name: str, figures: dict) -> Path:
    import keras
    import tensorflow as tf

    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "machine": machine(),
        "figures": figures,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    tmp.replace(path)
    print(f"figures written to {path}")
    return path


def spearman(a, b) -> float:
    """Spearman rank correlation (ties share their mean rank); 0.0 where one side is constant.

    scipy comes with the pinned set (tensorflow-model-optimization requires it).
    """
    import math

    from scipy.stats import spearmanr

    value = float(spearmanr(a, b).statistic)
    return 0.0 if math.isnan(value) else value
