"""Keras 3 model -> TFLite (float32, dynamic-range, float16, full int8), verified with LiteRT.

Conversion goes through ``model.export(..., format="tf_saved_model")`` and
``tf.lite.TFLiteConverter.from_saved_model``: converting an ad-hoc ``tf.function``
keeps resource variables, and int8 calibration then fails. ``signature=False``
freezes the variables of that function instead: the same graph (same ops, arena and
outputs) without the ``serving_default`` signature (a hundred bytes), converted without
writing a SavedModel, several times faster; the device-target planner measures its
candidates that way, the export ships the signed file.

Nothing here is assumed to work because the converter returned bytes: every
file is run with the LiteRT interpreter (``ai_edge_litert``) on test images and
compared with the Keras model (accuracy, argmax agreement, latency per image).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from mskd_tf import native_logs
from mskd_tf.config import EXPORT_KINDS as KINDS  # the --export choices
from mskd_tf.errors import MskdError


def dataset_arrays(ds, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Collect ``(images, labels)`` batches of a ``tf.data`` dataset into numpy arrays.

    Stops after ``max_images`` images (all when ``None``). Images are returned as
    float32, labels as int64 of shape ``(n,)``.
    """
    if ds is None:
        raise MskdError("A dataset of (images, labels) batches is required here, got None.")
    images, labels, count = [], [], 0
    for element in ds:
        if not isinstance(element, (tuple, list)) or len(element) < 2:
            raise MskdError(
                "The dataset must yield (images, labels) batches; got an element of type "
                f"{type(element).__name__}. Map it with `ds.map(lambda x, y: (x, y))`."
            )
        x, y = np.asarray(element[0], dtype=np.float32), np.asarray(element[1])
        if x.ndim != 4:
            raise MskdError(
                f"The dataset yields images of shape {x.shape}; expected batched NHWC images "
                "(batch, height, width, channels). Call `.batch(n)` on the dataset."
            )
        images.append(x)
        labels.append(y.reshape(len(x), -1).argmax(-1) if y.ndim > 1 and y.shape[-1] > 1 else y.reshape(-1))
        count += len(x)
        if max_images is not None and count >= max_images:
            break
    if not images:
        raise MskdError("The dataset is empty: no (images, labels) batch was produced.")
    x, y = np.concatenate(images), np.concatenate(labels).astype(np.int64)
    if max_images is not None:
        x, y = x[:max_images], y[:max_images]
    return x, y


def convert(model: keras.Model, kind: str, *, calibration_images: np.ndarray | None = None,
            signature: bool = True) -> bytes:
    """Convert a Keras 3 model to a TFLite flatbuffer of the given ``kind``.

    ``float32``: no optimisation. ``dynamic``: int8 weights, float activations.
    ``float16``: float16 weights. ``int8``: full integer with int8 input and output,
    calibrated on ``calibration_images`` (float32 NHWC images as the model takes them,
    one per calibration step). ``signature=False``: the model's inference function with its
    variables frozen, converted without a SavedModel (see the module docstring).
    """
    if kind not in KINDS:
        raise MskdError(f"kind={kind!r} is not a TFLite variant; use one of {', '.join(KINDS)}.")
    if kind == "int8" and (calibration_images is None or len(calibration_images) == 0):
        raise MskdError(
            "kind='int8' needs calibration images (the representative dataset); pass "
            "representative_ds / --num_calibration > 0."
        )
    with tempfile.TemporaryDirectory(prefix="mskd_export_") as tmp:
        if signature or len(model.inputs) != 1:
            saved = os.path.join(tmp, "saved_model")
            model.export(saved, format="tf_saved_model", verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        else:
            frozen = _frozen_inference(model)
            # The function as its own trackable object: the same frozen-graph path, without TF's per-call warning
            # that a missing trackable object is deprecated (a SavedModel detour is what it would take instead).
            converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], frozen)
        if kind != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if kind == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if kind == "int8":
            set_full_int8(converter, calibration_images)
        try:
            with native_logs.filtered_stderr(), warnings.catch_warnings():  # it prints its settings (fully_quantize..)
                # From a concrete function the converter asks for TF1's input ranges; calibration sets them.
                warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
                return converter.convert()
        except Exception as err:  # the converter raises ConverterError and plain RuntimeErrors
            raise MskdError(
                f"TFLite conversion to {kind} failed for model {model.name!r}: {str(err).strip()[:800]}. "
                "A layer with no TFLite builtin (e.g. a custom op) cannot be exported as "
                f"{kind}; replace it or choose other variants with --export."
            ) from err


def _frozen_inference(model: keras.Model):
    """The model's inference function (any batch size) with its variables made constants."""
    # TF's own freezing step (what converting a tf.keras model does); it has no public name.
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
    return convert_variables_to_constants_v2(
        tf.function(lambda images: model(images, training=False)).get_concrete_function(spec))


def set_full_int8(converter, calibration_images: np.ndarray) -> None:
    """Make ``converter`` write a full-integer model with int8 input and output, calibrated on the images.

    One image per calibration step (float32 NHWC, as the model takes them). Shared by
    :func:`convert` and the QAT export (:func:`mskd_tf.compat.qat_int8`).
    """
    samples = np.asarray(calibration_images, dtype=np.float32)

    def representative():
        for i in range(len(samples)):
            yield [samples[i : i + 1]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    # Integer-only ops, so the file also runs where there is no float kernel (TFLM, NPUs).
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8


def io_details(tflite_bytes: bytes) -> dict:
    """Input/output tensor facts of a .tflite model: shape, dtype name, scale, zero point.

    ``scale`` is 0.0 for float tensors (LiteRT's convention for "not quantized").
    """
    interpreter = _interpreter(tflite_bytes, threads=1, xnnpack=False)  # details only: no delegate to prepare

    def describe(detail):
        scale, zero_point = detail["quantization"]
        shape = [int(d) for d in detail["shape_signature"]]
        return {
            "shape": [1] + shape[1:],
            "dtype": np.dtype(detail["dtype"]).name,
            "scale": float(scale),
            "zero_point": int(zero_point),
        }

    return {
        "input": describe(interpreter.get_input_details()[0]),
        "output": describe(interpreter.get_output_details()[0]),
    }


def quantize_input(images: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Float images -> the integer input a quantized model expects: ``clip(round(x / scale) + zero_point)``."""
    info = np.iinfo(dtype)
    return np.clip(np.round(images / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer outputs -> float (identity for float tensors, where scale is 0)."""
    if not scale:
        return values.astype(np.float32)
    return (values.astype(np.float32) - zero_point) * scale


def _interpreter(tflite_bytes: bytes, threads: int, xnnpack: bool = True):
    # Imported here: ai_edge_litert pulls in its own runtime and is only needed at export.
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    options = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    try:
        with native_logs.filtered_stderr():  # XNNPACK announces its delegate
            interpreter = Interpreter(model_content=tflite_bytes, num_threads=threads, **options)
            interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as err:
        raise MskdError(f"LiteRT could not load the .tflite model ({len(tflite_bytes)} bytes): {err}") from err
    return interpreter


class LiteRTModel:
    """Run a .tflite model with LiteRT on float images, returning float logits.

    Quantizes the input and dequantizes the output for integer models, so the
    caller feeds the same float32 [0, 1] images as to the Keras model.

    ``kernels``: ``"xnnpack"`` (LiteRT's default CPU delegate), or ``"builtin"`` when XNNPACK refused to prepare
    the model; ``xnnpack_refusal`` then holds its message. XNNPACK refuses an int8 convolution whose input scale x
    filter scale / output scale is 256 or more, as when calibration saw a ReLU output that is always zero (a dead
    layer, e.g. in a ResNet-20 cut to 4-7 channels a layer); the builtin kernels run it.
    """

    def __init__(self, tflite_bytes: bytes, threads: int = 1):
        self._batch = 1
        self.kernels, self.xnnpack_refusal = "xnnpack", None
        try:  # XNNPACK refuses at allocate_tensors or at the first invoke, depending on the model
            self._load(tflite_bytes, threads, xnnpack=True)
        except (MskdError, RuntimeError) as err:
            if "XNNPACK" not in str(err):
                if isinstance(err, MskdError):
                    raise
                raise MskdError(f"LiteRT could not run the .tflite model ({len(tflite_bytes)} bytes): {err}") from err
            self._load(tflite_bytes, threads, xnnpack=False)
            self.kernels, self.xnnpack_refusal = "builtin", str(err).strip()

    def _load(self, tflite_bytes: bytes, threads: int, xnnpack: bool):
        self.interpreter = _interpreter(tflite_bytes, threads, xnnpack)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.interpreter.set_tensor(self._input["index"], np.zeros(self._input["shape"], self._input["dtype"]))
        with native_logs.filtered_stderr():
            self.interpreter.invoke()

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        scale, zero_point = self._input["quantization"]
        dtype = self._input["dtype"]
        if np.issubdtype(dtype, np.integer):
            return quantize_input(images, scale, zero_point, dtype)
        return images.astype(dtype)

    def _resize(self, batch: int):
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self._input["index"], [batch, *self._input["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._batch = batch

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Float logits for float32 NHWC images."""
        outputs = []
        for start in range(0, len(images), batch_size):
            chunk = self._prepare(images[start : start + batch_size])
            self._resize(len(chunk))
            self.interpreter.set_tensor(self._input["index"], chunk)
            self.interpreter.invoke()
            outputs.append(self.interpreter.get_tensor(self._output["index"]).copy())
        scale, zero_point = self._output["quantization"]
        return dequantize(np.concatenate(outputs), scale, zero_point)

    def latency_ms(self, images: np.ndarray, repeats: int = 50) -> float:
        """Median wall time of one single-image ``invoke`` in milliseconds (after a warm-up)."""
        self._resize(1)
        samples = [self._prepare(images[i % len(images)][None]) for i in range(repeats)]
        self.interpreter.set_tensor(self._input["index"], samples[0])
        self.interpreter.invoke()  # warm-up: first invoke packs weights / prepares XNNPACK
        times = []
        for sample in samples:
            self.interpreter.set_tensor(self._input["index"], sample)
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append(time.perf_counter() - start)
        return 1000.0 * statistics.median(times)


def verify_tflite(
    tflite_bytes: bytes,
    images: np.ndarray,
    labels: np.ndarray,
    keras_logits: np.ndarray,
    *,
    threads: tuple[int, ...] = (1, 2),
    latency_repeats: int = 50,
) -> dict:
    """Run a .tflite file with LiteRT on test images and compare it with the Keras model.

    Returns ``test_acc``, ``keras_acc``, ``agreement`` (fraction of images whose
    argmax equals the Keras argmax), ``max_abs_logit_diff``, ``litert_kernels`` (see
    :class:`LiteRTModel`) and ``latency_ms`` (median per image, keyed by thread count).
    """
    if len(images) == 0:
        raise MskdError("verify_tflite needs at least one test image.")
    runner = LiteRTModel(tflite_bytes, threads=threads[0])
    logits = runner.predict(images)
    if logits.shape != keras_logits.shape:
        raise MskdError(
            f"The .tflite model outputs shape {logits.shape[1:]} but the Keras model {keras_logits.shape[1:]}; "
            "was the file converted from a different model?"
        )
    predicted, keras_predicted = logits.argmax(-1), keras_logits.argmax(-1)
    return {
        "test_acc": float(np.mean(predicted == labels)),
        "keras_acc": float(np.mean(keras_predicted == labels)),
        "agreement": float(np.mean(predicted == keras_predicted)),
        "max_abs_logit_diff": float(np.max(np.abs(logits - keras_logits))),
        "litert_kernels": runner.kernels,
        "latency_ms": {
            n: float(f"{LiteRTModel(tflite_bytes, threads=n).latency_ms(images, latency_repeats):.4g}") for n in threads
        },
    }
