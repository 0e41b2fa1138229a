#!/usr/bin/env bash
# The README's main job, offline: compile a shipped noise-trained MNIST CNN (sigma = 0.25) to a W8A8 QDQ
# ONNX model, then certify that model afresh in onnxruntime on shipped sample images it never trained on
# (examples/data/NOTICE.md), checking it against arqc's torch simulation on the same noisy samples. The
# certificate travels in the ONNX file: `arqc report` reads it back from the file alone.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
arqc compile examples/models/mnist_cnn_sigma025.pt -o out/mnist_cnn_w8a8.onnx --bits 8 \
    --data npz:examples/data/mnist_sample_calib.npz --calib-images 200 \
    --sigma 0.25 --test-data npz:examples/data/mnist_sample_test.npz --num-images 100 \
    --n 1000 --n0 100 --alpha 0.001 --verify --report out/mnist_cnn_w8a8.report.json
arqc report out/mnist_cnn_w8a8.onnx
