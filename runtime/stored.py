"""An ONNX graph's weights read from their external file by diffrt itself: onnx's reader refuses a file with several
hard links ("a potential hardlink attack"), which `diffrt quantize --precision int8-weights` makes of a package's float
weights (its copy's and the source's) to save disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError


def stored_values(tensor, folder: Path) -> np.ndarray:
    """An initializer's values (from folder's external file at its offset, where it has one)."""
    import onnx
    from onnx import numpy_helper

    where = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location != onnx.TensorProto.EXTERNAL or "location" not in where:
        return numpy_helper.to_array(tensor)
    location = Path(where["location"])
    if location.is_absolute() or ".." in location.parts:
        raise UserError(f"{folder}: weight {tensor.name} is stored outside its folder ({location}); re-export the package")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    values = np.fromfile(folder / location, dtype=dtype, count=int(np.prod(tensor.dims)), offset=int(where.get("offset", 0)))
    return values.reshape(tuple(tensor.dims))


def loaded(path: Path):
    """path's ONNX model with every external weight read into it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.raw_data = np.ascontiguousarray(stored_values(tensor, path.parent)).tobytes()
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model
