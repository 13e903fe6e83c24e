"""Deployment kits and the ``export`` stage: TFLite variants, TFLite Micro check, MCU and Android kits.

* :func:`export_all` is the stage the pipeline calls: convert every requested
  variant (``mskd_tf.quantize``), verify each with LiteRT, run the int8 one in the
  TFLite Micro runtime, and write the micro and Android kits.
* Micro: :func:`micro_ops` lists a model's ops, :func:`check_micro_ops` fails on
  ops TFLM lacks, :func:`find_arena_size` searches the smallest tensor arena,
  :func:`evaluate_micro` runs test images, :func:`write_micro_kit` writes the C++
  array, header and op-resolver registration.
* Android: :func:`write_android_kit` writes the model, ``labels.txt`` and the JSON
  that tells the app the input shape, dtype, quantization and normalisation.
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from mskd_tf import quantize
from mskd_tf.errors import MskdError
from mskd_tf.workdir import write_atomic

# Below a few hundred bytes TFLM cannot even place its own allocator object
# (measured: 400 B segfaults, 500 B raises): no model fits, so refuse at once.
MIN_ARENA_BYTES = 2048
# Arena sizes are searched to this granularity (TFLM aligns buffers to 16 bytes).
ARENA_ALIGN = 16
TEMPLATE_PACKAGE = "mskd_tf.export_templates"  # the top-level export/ folder, shipped as package data (setup.py)


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
                "needs for its own bookkeeping; use find_arena_size() or a larger --micro_arena."
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


def find_arena_size(tflite_bytes: bytes, *, max_bytes: int = 64 << 20) -> int:
    """Smallest tensor arena (bytes, a multiple of 16) in which TFLM loads and runs the model.

    Doubles from :data:`MIN_ARENA_BYTES` until one works, then bisects; every
    size is tried in a child process (:func:`probe_arena`). Sizes are those of
    this 64-bit host; a 32-bit MCU needs somewhat less, optimised kernels
    (CMSIS-NN) may need scratch space more, hence the margin in the kit.
    """
    check_micro_ops(tflite_bytes)
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


# --------------------------------------------------------------------------- micro kit


def _c_identifier(name: str) -> str:
    identifier = re.sub(r"\W", "_", name)
    if not identifier or identifier[0].isdigit():
        identifier = "m_" + identifier
    return identifier


def c_array_source(tflite_bytes: bytes, name: str = "model", *, header: str | bool | None = None) -> str:
    """C++ source defining ``alignas(16) extern const unsigned char g_<name>_data[]`` and its length.

    ``header`` is the file to include (default ``<name>_data.h``); ``False`` includes none.
    """
    ident = _c_identifier(name)
    rows = []
    for start in range(0, len(tflite_bytes), 12):
        rows.append("    " + ", ".join(f"0x{b:02x}" for b in tflite_bytes[start : start + 12]) + ",")
    include = f'#include "{header or ident + "_data.h"}"\n\n' if header is not False else ""
    return (
        "// Generated by mskd_tf.deploy: the .tflite flatbuffer as a C array. Do not edit.\n"
        f"{include}"
        "// 16-byte alignment: TFLite Micro reads the flatbuffer in place. `extern`: a namespace-scope\n"
        "// const has internal linkage in C++, which would hide the array from other files.\n"
        f"alignas(16) extern const unsigned char g_{ident}_data[] = {{\n" + "\n".join(rows) + "\n};\n"
        f"extern const unsigned int g_{ident}_data_len = {len(tflite_bytes)};\n"
    )


def parse_c_array(source: str) -> bytes:
    """The bytes of the first ``unsigned char ...[] = {...}`` array in C source (inverse of :func:`c_array_source`)."""
    match = re.search(r"unsigned char\s+\w+\[\]\s*=\s*\{(.*?)\};", source, re.S)
    if not match:
        raise MskdError("No `unsigned char name[] = {...};` array found in the C source.")
    return bytes(int(token, 0) for token in re.findall(r"0x[0-9a-fA-F]+|\d+", match.group(1)))


def c_header(name: str, *, arena_bytes: int, io: dict, class_names: list[str] | None) -> str:
    """The data header: array declarations, arena size, I/O quantization, labels (no TFLM include)."""
    ident = _c_identifier(name)
    camel = _camel(ident)
    guard = f"MSKD_{ident.upper()}_DATA_H_"
    inp, out = io["input"], io["output"]
    names = class_names or [str(i) for i in range(out["shape"][-1])]
    quoted = ", ".join(json.dumps(str(c)) for c in names)
    dims = ", ".join(str(d) for d in inp["shape"])
    return f"""// Generated by mskd_tf.deploy for a TFLite Micro build. Do not edit.
#ifndef {guard}
#define {guard}

#include <cstddef>

extern const unsigned char g_{ident}_data[];
extern const unsigned int g_{ident}_data_len;

// Smallest arena measured on the host with the TFLM reference kernels, plus a margin.
inline constexpr size_t k{camel}ArenaSize = {arena_bytes};

// Input: {inp['dtype']} [{dims}]; q = round(pixel / 255 / scale) + zero_point for pixels in 0..255.
inline constexpr float k{camel}InputScale = {inp['scale']!r}f;
inline constexpr int k{camel}InputZeroPoint = {inp['zero_point']};
// Output: {out['dtype']} logits; logit = (q - zero_point) * scale.
inline constexpr float k{camel}OutputScale = {out['scale']!r}f;
inline constexpr int k{camel}OutputZeroPoint = {out['zero_point']};
inline constexpr int k{camel}NumClasses = {out['shape'][-1]};
inline constexpr const char* k{camel}Labels[] = {{{quoted}}};

#endif  // {guard}
"""


def c_ops_header(name: str, ops: list[str]) -> str:
    """The op header: a ``MicroMutableOpResolver`` sized to the model and a function registering its ops."""
    ident = _c_identifier(name)
    camel = _camel(ident)
    guard = f"MSKD_{ident.upper()}_OPS_H_"
    registrations = "\n".join(
        f"  if (resolver.{resolver_method(op)}() != kTfLiteOk) return kTfLiteError;" for op in ops
    )
    return f"""// Generated by mskd_tf.deploy for a TFLite Micro build. Do not edit.
#ifndef {guard}
#define {guard}

#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

// The ops this model uses ({', '.join(ops)}): register exactly these.
inline constexpr int k{camel}NumOps = {len(ops)};
using {camel}OpResolver = tflite::MicroMutableOpResolver<k{camel}NumOps>;

inline TfLiteStatus Register{camel}Ops({camel}OpResolver& resolver) {{
{registrations}
  return kTfLiteOk;
}}

#endif  // {guard}
"""


def _camel(identifier: str) -> str:
    return "".join(p.capitalize() for p in identifier.split("_") if p)


def write_micro_kit(
    tflite_bytes: bytes,
    out_dir: str,
    *,
    arena_bytes: int,
    margin: float = 0.25,
    name: str = "model",
    class_names: list[str] | None = None,
) -> dict:
    """Write ``<name>_data.cc``/``.h``, ``<name>_ops.h`` (+ ``main.cc``, README from ``export/micro/``) into ``out_dir``.

    The header's arena size is the measured ``arena_bytes`` plus ``margin``
    (fraction), rounded up to 16 bytes. Raises :class:`MskdError` when the model
    uses ops TFLite Micro lacks.
    """
    ops = check_micro_ops(tflite_bytes)
    if margin < 0:
        raise MskdError(f"margin={margin} must be >= 0 (a fraction of the measured arena to add).")
    ident = _c_identifier(name)
    with_margin = -(-int(arena_bytes * (1 + margin)) // ARENA_ALIGN) * ARENA_ALIGN
    io = quantize.io_details(tflite_bytes)
    header_name = f"{ident}_data.h"
    paths = {
        "header": write_atomic(
            os.path.join(out_dir, header_name),
            c_header(name, arena_bytes=with_margin, io=io, class_names=class_names),
        ),
        "ops_header": write_atomic(os.path.join(out_dir, f"{ident}_ops.h"), c_ops_header(name, ops)),
        "source": write_atomic(
            os.path.join(out_dir, f"{ident}_data.cc"), c_array_source(tflite_bytes, name, header=header_name)
        ),
    }
    paths.update(_copy_templates("micro", out_dir))
    return {"paths": paths, "ops": ops, "resolver_methods": [resolver_method(op) for op in ops], "arena_bytes_in_header": with_margin}


def _copy_templates(kind: str, out_dir: str) -> dict:
    """Copy the deployer-facing templates of ``export/<kind>/`` (package data) into ``out_dir``."""
    from importlib import resources

    try:
        source = resources.files(TEMPLATE_PACKAGE) / kind
    except ModuleNotFoundError:
        source = None
    if source is None or not source.is_dir():
        raise MskdError(f"the {kind} kit templates ({TEMPLATE_PACKAGE}/{kind}) are missing from this installation of "
                        "mskd_tf; reinstall it (pip install mskd_tf, or pip install -e . in a checkout).")
    copied = {}
    for entry in sorted(source.iterdir(), key=lambda e: e.name):
        if entry.is_file():
            copied[entry.name] = write_atomic(os.path.join(out_dir, entry.name), entry.read_bytes())
    return copied


def write_android_kit(
    tflite_bytes: bytes, out_dir: str, *, class_names: list[str] | None = None, kind: str = "int8"
) -> dict:
    """Write ``model.tflite``, ``labels.txt`` and ``model_info.json`` for an Android app into ``out_dir``.

    The JSON holds what the app must do to a camera frame: resize to the input
    shape, scale pixels to [0, 1], and (for int8 models) quantize with the given
    scale and zero point; per-channel mean/std normalisation is inside the model.
    """
    io = quantize.io_details(tflite_bytes)
    num_classes = io["output"]["shape"][-1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise MskdError(
            f"class_names has {len(names)} entries but the model outputs {num_classes} logits; "
            "pass one name per class, in label order."
        )
    inp = io["input"]
    integer_input = inp["dtype"].startswith(("int", "uint"))
    info = {
        "model_file": "model.tflite",
        "variant": kind,
        "input": inp,
        "output": {**io["output"], "meaning": "logits; apply softmax for probabilities"},
        "labels_file": "labels.txt",
        "normalisation": {
            "pixel_range": [0, 255],
            "model_input": "pixel / 255.0 (float in [0, 1]); per-channel mean/std is inside the model",
            "resize_to": inp["shape"][1:3],
            "channels": inp["shape"][3],
            "channel_order": "RGB" if inp["shape"][3] == 3 else "grayscale",
        },
    }
    if integer_input:
        info["normalisation"]["quantize"] = (
            f"q = clamp(round(pixel / 255.0 / {inp['scale']!r}) + {inp['zero_point']}, "
            f"{np.iinfo(inp['dtype']).min}, {np.iinfo(inp['dtype']).max}) as {inp['dtype']}"
        )
        # When scale is 1/255 the whole pre-processing is one integer add; say so.
        if abs(inp["scale"] * 255.0 - 1.0) < 1e-6:
            info["normalisation"]["shortcut"] = f"q = pixel + ({inp['zero_point']})"
    paths = {
        "model": write_atomic(os.path.join(out_dir, "model.tflite"), tflite_bytes),
        "labels": write_atomic(os.path.join(out_dir, "labels.txt"), "\n".join(names) + "\n"),
        "info": write_atomic(os.path.join(out_dir, "model_info.json"), json.dumps(info, indent=2) + "\n"),
    }
    paths.update(_copy_templates("android", out_dir))
    return {"paths": paths, "info": info}


# --------------------------------------------------------------------------- the export stage


def export_all(
    model,
    out_dir: str,
    *,
    kinds=("int8",),
    representative_ds,
    test_ds,
    num_calibration: int = 200,
    class_names: list[str] | None = None,
    qat: dict | None = None,
    micro: bool = True,
    micro_images: int = 100,
    arena_margin: float = 0.25,
    max_test_images: int | None = None,
    threads=(1, 2),
    seed: int = 0,
) -> list[dict]:
    """The ``export`` stage: convert, verify and package a trained Keras 3 classifier.

    For each kind in ``kinds`` (``float32``, ``dynamic``, ``float16``, ``int8``)
    writes ``out_dir/model_<kind>.tflite`` and verifies it with LiteRT on
    ``test_ds``. ``int8`` is calibrated on ``num_calibration`` images drawn
    (shuffled with ``seed``) from ``representative_ds`` (the training split). With
    ``qat`` (a dict of :func:`mskd_tf.compat.qat_int8` options, e.g. ``train_ds``,
    ``teacher``, ``epochs``) an ``int8_qat`` variant is added. With ``micro`` the
    int8 model is run in TFLite Micro on ``micro_images`` test images (a seeded sample), its
    smallest arena is searched, and ``out_dir/micro/`` gets the C++ kit.
    ``out_dir/android/`` gets the preferred variant (int8_qat > int8 > first kind).
    Writes ``out_dir/export.json`` and returns one dict per variant: kind, path,
    bytes, test_acc, keras_acc, agreement, latency_ms {threads: ms}; int8 also
    ``micro`` {arena_bytes, latency_ms, acc, ops, ...} and the kit paths.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in quantize.KINDS]
    if unknown or not kinds:
        raise MskdError(f"kinds={kinds!r}: each must be one of {', '.join(quantize.KINDS)} (at least one).")
    if qat is not None and not isinstance(qat, dict):
        raise MskdError(f"qat must be None or a dict of QAT options, got {type(qat).__name__}.")
    images, labels = quantize.dataset_arrays(test_ds)
    # Subsets are seeded samples, never the first N: folder test splits are sorted by class.
    rng = np.random.default_rng(seed)
    if max_test_images is not None and max_test_images < len(images):
        pick = np.sort(rng.permutation(len(images))[:max_test_images])
        images, labels = images[pick], labels[pick]
    keras_logits = np.asarray(model.predict(images, batch_size=128, verbose=0))
    calibration = None
    if "int8" in kinds or qat is not None:
        if num_calibration < 1:
            raise MskdError(f"num_calibration={num_calibration} must be >= 1 for int8 export.")
        pool, _ = quantize.dataset_arrays(representative_ds, max(num_calibration * 4, num_calibration))
        order = np.random.default_rng(seed).permutation(len(pool))[:num_calibration]
        calibration = pool[order]

    variants = [(kind, lambda k=kind: quantize.convert(model, k, calibration_images=calibration)) for kind in kinds]
    if qat is not None:
        from mskd_tf import compat  # tf_keras / tfmot load only on this path

        variants.append(("int8_qat", lambda: compat.qat_int8(model, calibration_images=calibration, **qat)))

    results = []
    for kind, build in variants:
        tflite_bytes = build()
        path = write_atomic(os.path.join(out_dir, f"model_{kind}.tflite"), tflite_bytes)
        checked = quantize.verify_tflite(tflite_bytes, images, labels, keras_logits, threads=tuple(threads))
        entry = {"kind": kind, "path": path, "bytes": len(tflite_bytes), **checked}
        entry["drop_vs_keras"] = entry["keras_acc"] - entry["test_acc"]
        results.append(entry)

    by_kind = {r["kind"]: r for r in results}
    micro_kind = "int8_qat" if "int8_qat" in by_kind else ("int8" if "int8" in by_kind else None)
    if micro and micro_kind:
        entry = by_kind[micro_kind]
        tflite_bytes = _read(entry["path"])
        ops = check_micro_ops(tflite_bytes)
        arena = find_arena_size(tflite_bytes)
        subset = np.sort(rng.permutation(len(images))[:micro_images])
        litert_logits = quantize.LiteRTModel(tflite_bytes).predict(images[subset])
        entry["micro"] = {
            "arena_bytes": arena,
            "ops": ops,
            **evaluate_micro(tflite_bytes, images[subset], labels[subset], arena_size=arena, litert_logits=litert_logits),
        }
        kit = write_micro_kit(
            tflite_bytes, os.path.join(out_dir, "micro"), arena_bytes=arena, margin=arena_margin, class_names=class_names
        )
        entry["micro"]["arena_bytes_in_header"] = kit["arena_bytes_in_header"]
        entry["micro_kit"] = kit["paths"]

    android_kind = micro_kind or results[0]["kind"]
    android = write_android_kit(
        _read(by_kind[android_kind]["path"]), os.path.join(out_dir, "android"), class_names=class_names, kind=android_kind
    )
    by_kind[android_kind]["android_kit"] = android["paths"]
    write_atomic(os.path.join(out_dir, "export.json"), json.dumps(results, indent=2, default=str) + "\n")
    return results


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()

