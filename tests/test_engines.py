"""The onnxruntime engine's CUDA settings and error reporting, checked without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffrt.runtime.backends.onnxruntime import OrtEngine, check_provider, cuda_provider, load_error
from diffrt.runtime.errors import UserError

GRAPH = Path("unet/model.onnx")


@pytest.mark.parametrize("message, says", [
    ("This session cannot use the graph capture feature as requested by the user as all compute graph nodes have not "
     "been partitioned to the CUDAExecutionProvider", "cannot capture .* as a CUDA graph.*--attention mha"),
    ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory", "out of memory loading"),
    ("Failed to allocate memory for requested buffer of size 4398046511104", "out of memory loading"),
    ("libcudnn.so.9: cannot open shared object file: No such file or directory", "library onnxruntime needs .* missing"),
    ("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from x failed:Protobuf parsing failed.", "corrupt"),
    ("[ONNXRuntimeError] : 1 : FAIL : Node (Conv_3) Op (Conv) [ShapeInferenceError] kernel mismatch",
     "onnxruntime could not load .*: .*kernel mismatch"),
])
def test_load_errors_say_what_they_are(message, says):
    error = load_error(GRAPH, RuntimeError(message + "\nsecond line"))
    assert isinstance(error, UserError)
    assert __import__("re").search(says, str(error)) and "\n" not in str(error)


def test_a_graph_capture_refusal_is_not_called_corruption():
    assert "corrupt" not in str(load_error(GRAPH, RuntimeError("graph capture feature is not supported")))


def test_a_corrupt_file_is_reported_as_such(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(UserError, match="corrupt"):
        OrtEngine(bad)


class FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self.providers = providers

    def get_providers(self) -> list[str]:
        return self.providers


def test_a_cuda_provider_that_did_not_start_is_refused():
    """onnxruntime lists CUDA among its providers even when its libraries fail to load, then runs on the CPU."""
    with pytest.raises(UserError, match="CUDA provider did not start"):
        check_provider(FakeSession(["CPUExecutionProvider"]), GRAPH, "ort-cuda")
    check_provider(FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"]), GRAPH, "ort-cuda")
    check_provider(FakeSession(["CPUExecutionProvider"]), GRAPH, "ort-cpu")


def test_cuda_provider_options():
    name, options = cuda_provider(False, None)
    assert name == "CUDAExecutionProvider" and options["arena_extend_strategy"] == "kSameAsRequested"
    assert "enable_cuda_graph" not in options and "gpu_mem_limit" not in options
    _, options = cuda_provider(True, 2 * 2**30)
    assert options["enable_cuda_graph"] == "1" and options["gpu_mem_limit"] == str(2 * 2**30)


def test_gpu_options_need_ort_cuda(tmp_path):
    """The engine refuses CUDA options off CUDA (the registry has refused them in one line before it is reached)."""
    with pytest.raises(ValueError, match="ort-cuda"):
        OrtEngine(tmp_path / "model.onnx", "ort-cpu", gpu_mem_limit=2**30)


def test_missing_onnxruntime_names_the_extras(monkeypatch):
    import sys

    from diffrt.runtime.backends.registry import resolve

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when it is not installed
    with pytest.raises(UserError, match=r'diffrt\[cpu\].*diffrt\[gpu\]'):
        resolve("auto")


def test_the_gpu_extra_does_not_pull_the_cpu_onnxruntime():
    """onnxruntime and onnxruntime-gpu share one import folder: the base install names neither, each extra one."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    assert project["optional-dependencies"]["cpu"] == ["onnxruntime>=1.17"]
    assert project["optional-dependencies"]["gpu"] == ["onnxruntime-gpu>=1.20"]


def test_the_gpu_test_lane_installs_only_the_cuda_onnxruntime():
    """`pip install -e ".[dev-gpu]"` (the gpu-marked tests' install line) pulls onnxruntime-gpu and not the CPU
    onnxruntime, which would shadow it and skip every GPU test; `.[dev]` pulls the CPU one only."""
    import re

    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def closure(extra: str) -> set[str]:
        found = set()
        for dep in extras[extra]:
            inner = re.fullmatch(r"diffrt\[(.*)\]", dep)
            found |= set().union(*(closure(e) for e in inner.group(1).split(","))) if inner else {re.split(r"[<>=\[ ]", dep)[0]}
        return found

    assert "onnxruntime-gpu" in closure("dev-gpu") and "onnxruntime" not in closure("dev-gpu")
    assert "onnxruntime" in closure("dev") and "onnxruntime-gpu" not in closure("dev")


def test_ctrl_c_while_onnxruntime_loads_is_an_interrupt_not_a_missing_install():
    from diffrt.runtime.backends.onnxruntime import interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as inner:
            raise ImportError("onnxruntime failed to load") from inner
    except ImportError as exc:
        assert interrupted(exc)
    assert not interrupted(ImportError("No module named 'onnxruntime'"))
