// Minimal image classifier for an mskd_tf Android kit (model.tflite, labels.txt, model_info.json
// in assets/). Dependency: com.google.ai.edge.litert:litert (Java package org.tensorflow.lite).
package com.example.mskd

import android.content.Context
import android.graphics.Bitmap
import org.json.JSONObject
import org.tensorflow.lite.Interpreter
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import kotlin.math.roundToInt

class Classifier(context: Context, threads: Int = 2) {
    private val info = JSONObject(context.assets.open("model_info.json").bufferedReader().readText())
    private val labels = context.assets.open("labels.txt").bufferedReader().readLines()
    private val input = info.getJSONObject("input")
    private val output = info.getJSONObject("output")
    private val shape = input.getJSONArray("shape")          // [1, H, W, C]
    private val height = shape.getInt(1)
    private val width = shape.getInt(2)
    private val channels = shape.getInt(3)
    private val isInt8 = input.getString("dtype") == "int8"
    private val inScale = input.getDouble("scale").toFloat()
    private val inZero = input.getInt("zero_point")
    private val outScale = output.getDouble("scale").toFloat()
    private val outZero = output.getInt("zero_point")

    private val interpreter = Interpreter(loadModel(context), Interpreter.Options().setNumThreads(threads))

    private fun loadModel(context: Context): ByteBuffer {
        val fd = context.assets.openFd(info.getString("model_file"))
        FileInputStream(fd.fileDescriptor).channel.use { channel ->
            return channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
        }
    }

    /** Returns (label, logit) of the best class for a frame. */
    fun classify(frame: Bitmap): Pair<String, Float> {
        val scaled = Bitmap.createScaledBitmap(frame, width, height, true)
        val pixels = IntArray(width * height).also { scaled.getPixels(it, 0, width, 0, 0, width, height) }
        val bytesPerValue = if (isInt8) 1 else 4
        val buffer = ByteBuffer.allocateDirect(width * height * channels * bytesPerValue).order(ByteOrder.nativeOrder())
        for (p in pixels) {
            val rgb = intArrayOf((p shr 16) and 0xFF, (p shr 8) and 0xFF, p and 0xFF)
            val values = if (channels == 1) intArrayOf((rgb[0] * 299 + rgb[1] * 587 + rgb[2] * 114) / 1000) else rgb
            for (v in values) {
                val x = v / 255f  // the model normalises mean/std itself
                if (isInt8) buffer.put(((x / inScale).roundToInt() + inZero).coerceIn(-128, 127).toByte())
                else buffer.putFloat(x)
            }
        }
        buffer.rewind()
        val logits: FloatArray
        if (isInt8) {
            val raw = Array(1) { ByteArray(labels.size) }
            interpreter.run(buffer, raw)
            logits = FloatArray(labels.size) { (raw[0][it] - outZero) * outScale }
        } else {
            val raw = Array(1) { FloatArray(labels.size) }
            interpreter.run(buffer, raw)
            logits = raw[0]
        }
        val best = logits.indices.maxByOrNull { logits[it] } ?: 0
        return labels[best] to logits[best]
    }
}
