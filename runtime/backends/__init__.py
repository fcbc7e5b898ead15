"""Backends: the engine seam (engine.py), the registry of backends and their capabilities (registry.py), and one
module per backend (onnxruntime.py, openvino.py, tensorrt.py with engine_store.py for its plans)."""
