#!/usr/bin/env bash
# The README's main job, offline: the headline command on a shipped noise-trained MNIST CNN (sigma = 0.25).
# `arqc compile MODEL -o OUT --sigma S` with no precision given runs the ARQ search at the default budget
# (1.5625 % of FP32 BitOps) on the training images the checkpoint names, fine-tunes the chosen policy, lowers
# it to QDQ ONNX and certifies that file afresh in onnxruntime on the test images the checkpoint names (shipped
# samples it never trained on: examples/data/NOTICE.md), next to FP32, checking onnxruntime against arqc's torch
# simulation on the same noisy samples. The options after --sigma only shorten the search and the certificate
# to fit a few minutes on 2 cores. The certificate travels in the ONNX file: `arqc report` reads it back.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
rm -rf out/mnist_cnn.onnx.arqc  # a fresh search every time (the work directory would resume it)
arqc compile examples/models/mnist_cnn_sigma025.pt -o out/mnist_cnn.onnx --sigma 0.25 \
    --episodes 16 --warmup 6 --search-images 40 --cache-n 1000 --num-images 100 --n 1000 --verify \
    --report out/mnist_cnn.report.json
arqc report out/mnist_cnn.onnx
