"""Native log lines that read as failures on a CPU machine, kept off the terminal unless asked for.

TensorFlow's and LiteRT's C++ code writes to file descriptor 2 directly (Python's ``warnings`` and ``logging``
never see it): the CUDA probe's ``E0000 ... failed call to cuInit`` on every CPU-only machine, absl's notice that
it logs before ``InitializeLog``, the oneDNN notice, the converter's ``fully_quantize: 0, ...`` settings dump and
XNNPACK's "Created delegate" line. :func:`filtered_stderr` sends the descriptor to a file for the length of a
block and writes back every line except those; ``set_verbose(True)`` (the CLI's ``--verbose``) writes back all.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:. ]+\d+ \S+:\d+\] "  # absl INFO / WARNING lines logged before InitializeLog
    r"|E\d{4} [\d:. ]+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"
    r"|fully_quantize: \d+, inference_type: "
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)"
)
_SETTINGS = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    _SETTINGS["verbose"] = bool(verbose)


def is_noise(line: str) -> bool:
    return bool(NOISE.match(line))


@contextlib.contextmanager
def filtered_stderr():
    """Inside this block, native code's lines on stderr that are only noise are dropped (see the module doc)."""
    if _SETTINGS["verbose"]:
        yield
        return
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr without a descriptor: leave it alone
        yield
        return
    sys.stderr.flush()
    saved = os.dup(descriptor)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), descriptor)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, descriptor)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
