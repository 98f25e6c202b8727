#!/usr/bin/env bash
# Wheels the GPU host lacks, for `benchmarks/gpu_run.sh` (run here, where PyPI is reachable).
#
# The device hosts (the `device` tool's nvidia-h200 kind) run Python 3.12 with PyTorch,
# JAX, numpy, scipy, h5py and pytest but no Keras, no TensorFlow and no network. The device
# path, its tests and benchmarks.pipeline need Keras 3 and event-model beside those; this
# downloads them and their missing dependencies (fabio for the real TIFF frames that
# training/gpu_train.sh reads; without hdf5plugin, which fabio imports only for HDF5 formats) (no TensorFlow: the host runs KERAS_BACKEND
# jax or torch) into .whl/ (git-ignored, ~5 MB), which the `run` call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    keras==3.15.1 namex==0.1.0 optree==0.20.0 \
    event-model==1.24.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
    fabio==2026.6.0
ls -l .whl
