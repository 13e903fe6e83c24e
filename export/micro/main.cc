// Example TFLite Micro program for a model exported by mskd_tf (`export` stage, micro kit).
//
// The kit next to this file holds:
//   model_data.cc / model_data.h  the int8 .tflite as an aligned const array, its length,
//                                 the tensor-arena size (measured + margin), the input/output
//                                 quantization and the class labels;
//   model_ops.h                   a MicroMutableOpResolver sized to the model and
//                                 RegisterModelOps(), which adds exactly the ops it uses.
// Build it inside a TFLite Micro tree (or a vendor SDK that ships TFLM) next to your
// camera / sensor code; replace ReadPixel() with your image source.

#include <cstdint>

#include "model_data.h"
#include "model_ops.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {
// TFLM plans every tensor inside this buffer; 16-byte alignment as the kernels expect.
alignas(16) uint8_t tensor_arena[kModelArenaSize];

// Replace with your image source: pixel `index` of an HxWxC frame, 0..255, resized to the
// input shape in model_data.h, same channel order as training (RGB or grayscale).
uint8_t ReadPixel(int index) { return static_cast<uint8_t>(index % 256); }

int8_t QuantizePixel(uint8_t pixel) {
  // Per-channel mean/std normalisation is inside the model: feed pixel / 255, quantized.
  const float q = static_cast<float>(pixel) / 255.0f / kModelInputScale + kModelInputZeroPoint;
  const float rounded = q < 0 ? q - 0.5f : q + 0.5f;
  return static_cast<int8_t>(rounded < -128 ? -128 : (rounded > 127 ? 127 : rounded));
}
}  // namespace

int main() {
  tflite::InitializeTarget();
  const tflite::Model* model = tflite::GetModel(g_model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    MicroPrintf("Model schema %d != TFLM schema %d", model->version(), TFLITE_SCHEMA_VERSION);
    return 1;
  }
  ModelOpResolver resolver;
  if (RegisterModelOps(resolver) != kTfLiteOk) {
    MicroPrintf("Registering the model's ops failed");
    return 1;
  }
  tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, kModelArenaSize);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    MicroPrintf("Arena of %d bytes too small: raise kModelArenaSize", static_cast<int>(kModelArenaSize));
    return 1;
  }
  MicroPrintf("Arena used: %d of %d bytes", static_cast<int>(interpreter.arena_used_bytes()),
              static_cast<int>(kModelArenaSize));

  TfLiteTensor* input = interpreter.input(0);
  for (int i = 0; i < static_cast<int>(input->bytes); ++i) {
    input->data.int8[i] = QuantizePixel(ReadPixel(i));
  }
  if (interpreter.Invoke() != kTfLiteOk) {
    MicroPrintf("Invoke failed");
    return 1;
  }
  const TfLiteTensor* output = interpreter.output(0);
  int best = 0;
  for (int c = 1; c < kModelNumClasses; ++c) {
    if (output->data.int8[c] > output->data.int8[best]) best = c;
  }
  const float logit = (output->data.int8[best] - kModelOutputZeroPoint) * kModelOutputScale;
  MicroPrintf("class %d (%s), logit %f", best, kModelLabels[best], static_cast<double>(logit));
  return 0;
}
