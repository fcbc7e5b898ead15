#!/usr/bin/env bash
# The CPU peers of `diffrt bench --baseline openvino-genai,optimum` in the active virtual environment (one made as the
# README says): OpenVINO GenAI and optimum-onnx from the project's `peers` extra, then optimum-intel, which writes the
# OpenVINO export GenAI reads, without its dependencies (it asks for optimum 2.3 and torchvision, which would replace
# optimum-onnx's optimum 2.1 and torch 2.13; its export runs on what is installed: ../shared/FACTS.md, docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[export,peers]"
python -m pip install -q --no-deps "optimum-intel==2.2.0"
# stable-diffusion.cpp's Python binding ships as source only: it compiles (130-160 s on 2 cores), tuned to this CPU
CMAKE_ARGS="-DGGML_NATIVE=ON" python -m pip install -q "stable-diffusion-cpp-python==0.4.7"
python -c "import openvino_genai, optimum.intel.openvino, optimum.onnxruntime, stable_diffusion_cpp; print('peers ready')"
