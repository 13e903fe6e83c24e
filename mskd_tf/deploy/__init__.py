"""The ``export`` stage: TFLite variants, the TFLite Micro check, and the MCU and Android kits.

:func:`export_all` converts every requested variant (:mod:`mskd_tf.quantize`), verifies each
with LiteRT, runs the int8 one in TFLite Micro and writes the kits; each job is a module:

* :mod:`~mskd_tf.deploy.tflm`: op discovery, arena search, running in the TFLM runtime;
* :mod:`~mskd_tf.deploy.micro_kit`: the C++ array, header and op-resolver registration;
* :mod:`~mskd_tf.deploy.android_kit`: model, ``labels.txt`` and ``model_info.json`` for an app;
* :mod:`~mskd_tf.deploy.templates`: the deployer-facing files both kits copy.

The kits' and TFLM's public names are importable from here too (``mskd_tf.deploy.find_arena_size``, ...).
"""

from __future__ import annotations

import json
import os

import numpy as np

from mskd_tf import quantize
from mskd_tf.deploy.android_kit import write_android_kit
from mskd_tf.deploy.micro_kit import c_array_source, c_header, c_ops_header, parse_c_array, write_micro_kit
from mskd_tf.deploy.tflm import (
    ARENA_ALIGN,
    MIN_ARENA_BYTES,
    MicroModel,
    check_micro_ops,
    evaluate_micro,
    find_arena_size,
    micro_ops,
    probe_arena,
    resolver_method,
    tflm_supported_ops,
)
from mskd_tf.errors import MskdError
from mskd_tf.workdir import write_atomic

__all__ = [
    "ARENA_ALIGN", "MIN_ARENA_BYTES", "MicroModel", "c_array_source", "c_header", "c_ops_header", "check_micro_ops",
    "evaluate_micro", "export_all", "find_arena_size", "micro_ops", "parse_c_array", "probe_arena",
    "resolver_method", "tflm_supported_ops", "write_android_kit", "write_micro_kit",
]


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

