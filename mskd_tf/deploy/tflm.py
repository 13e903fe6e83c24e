"""TFLite Micro: which ops a model uses and whether TFLM has them, and running it in the TFLM runtime.

* :func:`micro_ops` lists a model's ops, :func:`check_micro_ops` fails on ops TFLM lacks,
  :func:`resolver_method` names the ``MicroMutableOpResolver`` call that registers an op;
* :func:`arena_usage` reads the arena TFLM used, :func:`find_arena_size` the smallest that works, :class:`MicroModel` runs
  images with a fixed arena, :func:`evaluate_micro` scores test images against LiteRT.
"""

from __future__ import annotations

import functools
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from mskd_tf import quantize
from mskd_tf.errors import MskdError

# Below a few hundred bytes TFLM cannot even place its own allocator object
# (measured: 400 B segfaults, 500 B raises): no model fits, so refuse at once.
MIN_ARENA_BYTES = 2048
# Arena sizes are searched to this granularity (TFLM aligns buffers to 16 bytes).
ARENA_ALIGN = 16


# --------------------------------------------------------------------------- ops


def _schema():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


@functools.cache
def _builtin_names() -> dict[int, str]:
    return {code: name for name, code in vars(_schema().BuiltinOperator).items() if not name.startswith("_")}


def micro_ops(tflite_bytes: bytes) -> list[str]:
    """The distinct operators a .tflite model uses, by TFLite builtin name (``CONV_2D``, ...).

    Custom operators appear as ``CUSTOM:<name>``. Sorted, for a stable op list.
    """
    from tflite_micro.python.tflite_micro.runtime import get_builtin_code_from_operator_code

    schema = _schema()
    model = schema.Model.GetRootAsModel(bytearray(tflite_bytes), 0)
    used = set()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            opcode = model.OperatorCodes(subgraph.Operators(o).OpcodeIndex())
            code = get_builtin_code_from_operator_code(opcode)
            if code == schema.BuiltinOperator.CUSTOM:
                used.add("CUSTOM:" + opcode.CustomCode().decode())
            else:
                used.add(_builtin_names().get(code, f"BUILTIN_{code}"))
    return sorted(used)


@functools.cache
def tflm_supported_ops() -> frozenset[str]:
    """Builtin ops the installed TFLite Micro runtime has kernels for.

    Derived from the ``tflite_micro`` package itself, not from a hand-written list:
    every TFLM kernel is registered by a function ``tflite::Register_<OP>()``
    whose mangled name is in the runtime's shared library; the names that are
    TFLite builtin operators (schema ``BuiltinOperator``) are the supported set.
    The Python runtime's resolver (``PythonOpsResolver``) registers all of them.
    """
    from tflite_micro.python.tflite_micro import _runtime

    with open(_runtime.__file__, "rb") as handle:
        binary = handle.read()
    registered = {m.decode() for m in re.findall(rb"Register_([A-Z0-9_]+)Ev", binary)}
    builtins = set(_builtin_names().values())
    return frozenset(registered & builtins)


# MicroMutableOpResolver method names that do not follow CamelCase(OP_NAME).
_RESOLVER_EXCEPTIONS = {
    "BATCH_MATMUL": "AddBatchMatMul",
    "CUMSUM": "AddCumSum",
    "PADV2": "AddPadV2",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
}


def resolver_method(op_name: str) -> str:
    """The ``tflite::MicroMutableOpResolver`` method that registers a builtin op (``CONV_2D`` -> ``AddConv2D``)."""
    if op_name in _RESOLVER_EXCEPTIONS:
        return _RESOLVER_EXCEPTIONS[op_name]
    parts = [p.upper() if re.fullmatch(r"\d+D", p) else p.capitalize() for p in op_name.split("_")]
    return "Add" + "".join(parts)


def check_micro_ops(tflite_bytes: bytes) -> list[str]:
    """Return the model's op list, or raise :class:`MskdError` naming the ops TFLite Micro lacks."""
    ops = micro_ops(tflite_bytes)
    missing = [op for op in ops if op not in tflm_supported_ops()]
    if missing:
        raise MskdError(
            f"The model uses op(s) that TFLite Micro has no kernel for: {', '.join(missing)}. "
            "Replace the layers that produce them (e.g. gelu/swish activations -> relu/relu6, "
            "custom ops -> builtin layers) or export without --micro."
        )
    return ops


# --------------------------------------------------------------------------- TFLM runtime


# Run in a child process: when TFLM runs out of arena while placing its persistent
# ("tail") buffers it can crash the whole process (measured: ResNet-20 at 8 KB
# segfaults, 16 KB raises), so no arena size is tried in-process before a child
# has shown it works.
_PROBE = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
with open(sys.argv[1], "rb") as handle:
    data = handle.read()
try:
    interpreter = runtime.Interpreter.from_bytes(data, arena_size=int(sys.argv[2]))
    detail = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(detail["shape"], detail["dtype"]), 0)
    interpreter.invoke()
except RuntimeError as err:
    sys.stderr.write(str(err))
    sys.exit(3)
"""


def probe_arena(tflite_bytes: bytes, arena_size: int) -> tuple[bool, str]:
    """(works, TFLM's messages): load and invoke the model with ``arena_size`` bytes in a child process."""
    with tempfile.NamedTemporaryFile(suffix=".tflite") as model_file:
        model_file.write(tflite_bytes)
        model_file.flush()
        child = subprocess.run(
            [sys.executable, "-c", _PROBE, model_file.name, str(int(arena_size))],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if child.returncode == 0:
        return True, ""
    how = "crashed" if child.returncode < 0 else "failed"
    return False, f"TFLM {how}: " + " ".join(child.stderr.split())[-300:]


class MicroModel:
    """An int8 .tflite model loaded in the TFLite Micro runtime with a fixed arena.

    Raises :class:`MskdError` naming the arena size when TFLM cannot allocate
    the model's tensors in it.
    """

    def __init__(self, tflite_bytes: bytes, arena_size: int):
        from tflite_micro.python.tflite_micro import runtime

        if arena_size < MIN_ARENA_BYTES:
            raise MskdError(
                f"arena_size={arena_size} bytes is below the {MIN_ARENA_BYTES}-byte minimum TFLite Micro "
                "needs for its own bookkeeping; pass a larger arena_size, or let find_arena_size() measure it."
            )
        check_micro_ops(tflite_bytes)
        works, log = probe_arena(tflite_bytes, arena_size)
        if not works:
            raise MskdError(
                f"TFLite Micro could not allocate the model's tensors in an arena of {arena_size} bytes "
                f"({log}). Use a larger arena; find_arena_size() searches the smallest that works."
            )
        self.interpreter = runtime.Interpreter.from_bytes(bytes(tflite_bytes), arena_size=arena_size)
        self.input = self.interpreter.get_input_details(0)
        self.output = self.interpreter.get_output_details(0)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """(float logits, median milliseconds per image) for float32 NHWC images, one invoke each."""
        in_q, out_q = self.input["quantization_parameters"], self.output["quantization_parameters"]
        dtype = self.input["dtype"]
        if np.issubdtype(dtype, np.integer):
            inputs = quantize.quantize_input(images, in_q["scales"][0], in_q["zero_points"][0], dtype)
        else:
            inputs = images.astype(dtype)
        outputs, times = [], []
        for sample in inputs:
            self.interpreter.set_input(sample[None], 0)
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append(time.perf_counter() - start)
            outputs.append(np.array(self.interpreter.get_output(0)).reshape(-1))
        # Float outputs carry no quantization parameters (empty lists).
        scale = float(out_q["scales"][0]) if len(out_q["scales"]) else 0.0
        zero_point = int(out_q["zero_points"][0]) if len(out_q["zero_points"]) else 0
        return quantize.dequantize(np.stack(outputs), scale, zero_point), 1000.0 * statistics.median(times)


_USAGE = _PROBE.replace("    interpreter.invoke()\n", "    interpreter.invoke()\n    interpreter.print_allocations()\n")
_USAGE_LINE = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")


def arena_usage(tflite_bytes: bytes, *, max_bytes: int = 64 << 20) -> dict | None:
    """TFLM's own record of the arena the model used: ``{"total", "head", "tail"}`` bytes, or None.

    One child process runs the model in a ``max_bytes`` arena with TFLM's recording allocator and reads
    its report: ``head`` is the planned (non-persistent) part, the activations; ``tail`` the persistent
    part (tensor structs, quantization and op data). None when it did not run in ``max_bytes``.
    """
    with tempfile.NamedTemporaryFile(suffix=".tflite") as model_file:
        model_file.write(tflite_bytes)
        model_file.flush()
        child = subprocess.run([sys.executable, "-c", _USAGE, model_file.name, str(int(max_bytes))],
                               capture_output=True, text=True, timeout=600)
    usage = {key: int(value) for key, value in _USAGE_LINE.findall(child.stderr + child.stdout)}
    return usage if child.returncode == 0 and "total" in usage else None


def find_arena_size(tflite_bytes: bytes, *, max_bytes: int = 64 << 20) -> int:
    """Smallest tensor arena (bytes, a multiple of 16) in which TFLM loads and runs the model.

    TFLM's recording allocator says how much the model used (:func:`arena_usage`); that size, rounded up
    to 16 bytes, is confirmed by a run in exactly that arena. If the record is missing or its size fails,
    sizes are searched instead: doubled from :data:`MIN_ARENA_BYTES` until one works, then bisected. Every
    size is tried in a child process (:func:`probe_arena`). Sizes are those of this 64-bit host; a 32-bit
    MCU needs somewhat less, optimised kernels (CMSIS-NN) may need scratch space more, hence the margin in
    the kit.
    """
    check_micro_ops(tflite_bytes)
    usage = arena_usage(tflite_bytes, max_bytes=max_bytes)
    if usage is not None:
        recorded = max(MIN_ARENA_BYTES, -(-usage["total"] // ARENA_ALIGN) * ARENA_ALIGN)
        if probe_arena(tflite_bytes, recorded)[0]:
            return recorded
    low, high = MIN_ARENA_BYTES, MIN_ARENA_BYTES
    while not probe_arena(tflite_bytes, high)[0]:
        low, high = high, high * 2
        if high > max_bytes:
            raise MskdError(
                f"TFLite Micro could not run the model with an arena of up to {max_bytes} bytes; "
                "the model is too large for a microcontroller build (prune harder or export without --micro)."
            )
    if low == high:
        return high
    # Invariant: `low` fails, `high` works.
    while high - low > ARENA_ALIGN:
        middle = (low + high) // 2 // ARENA_ALIGN * ARENA_ALIGN
        if middle <= low:
            break
        if probe_arena(tflite_bytes, middle)[0]:
            high = middle
        else:
            low = middle
    return high


def evaluate_micro(
    tflite_bytes: bytes, images: np.ndarray, labels: np.ndarray, *, arena_size: int, litert_logits: np.ndarray
) -> dict:
    """Run test images in TFLite Micro: accuracy, argmax agreement with LiteRT, median ms per image."""
    logits, latency = MicroModel(tflite_bytes, arena_size).predict(images)
    predicted = logits.argmax(-1)
    return {
        "acc": float(np.mean(predicted == labels)),
        "litert_acc": float(np.mean(litert_logits.argmax(-1) == labels)),
        "agreement_with_litert": float(np.mean(predicted == litert_logits.argmax(-1))),
        "latency_ms": float(f"{latency:.4g}"),
        "images": int(len(images)),
    }
