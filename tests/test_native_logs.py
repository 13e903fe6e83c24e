"""The native-log filter: known noise from TF / LiteRT's C++ code is dropped, everything else kept, in order."""

import subprocess
import sys

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796636466.744366   14874 port.cc:153] oneDNN custom operations are on.",
    "E0000 00:00:1796636468.068046   14874 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    "fully_quantize: 0, inference_type: 6, input_inference_type: INT8, output_inference_type: INT8",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
]
KEPT = ["E0000 00:00:1.0 1 conv_ops.cc:10] a real native error", "Traceback (most recent call last):"]

SCRIPT = """
import os, sys
from mskd_tf import native_logs
native_logs.set_verbose({verbose})
with native_logs.filtered_stderr():
    for line in {lines!r}:
        os.write(2, (line + "\\n").encode())  # as C++ code writes: straight to the descriptor
print("after", file=sys.stderr)
"""


def run(verbose):
    lines = [NOISE[0], KEPT[0], *NOISE[1:], KEPT[1]]
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(verbose=verbose, lines=lines)],
                          capture_output=True, text=True, check=True)
    return done.stderr.splitlines()


def test_noise_is_dropped_and_other_lines_kept_in_order():
    assert run(verbose=False) == [*KEPT, "after"]


def test_verbose_keeps_every_line():
    assert run(verbose=True) == [NOISE[0], KEPT[0], *NOISE[1:], KEPT[1], "after"]
