"""Tensor datatypes of the Open Inference Protocol (KServe V2) and Triton, keyed by NumPy dtype name.

One table for the V2 server (serve/v2.py), the V2 client (client.py) and Triton packaging (package.py). It
imports nothing, so the client's REST path stays free of NumPy.
"""

from __future__ import annotations

# NumPy dtype name -> V2 datatype. BF16 has no NumPy dtype; it is listed for Triton's model config.
V2_BY_NUMPY: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
}
# V2 datatype -> NumPy dtype name, for the datatypes NumPy can hold.
NUMPY_BY_V2: dict[str, str] = {v2: name for name, v2 in V2_BY_NUMPY.items() if v2 != "BF16"}


def triton_type(numpy_name: str) -> str:
    """Triton's model-config type (``TYPE_FP32``) for a NumPy dtype name; ``KeyError`` when it has none."""
    return "TYPE_" + V2_BY_NUMPY[numpy_name]
