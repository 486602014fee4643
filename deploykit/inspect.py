"""``inspect_model``: what an ONNX file holds (inputs, outputs, opset, size, parameters, card). No torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.card import CARD_KEY, ModelCard, card_from_metadata, load_onnx
from deploykit.errors import ModelFileError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class InspectResult:
    """A summary of one ONNX file."""

    path: Path
    size_bytes: int
    opset: int
    ir_version: int
    producer: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parameters: int
    nodes: int
    card: ModelCard | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "parameters": self.parameters,
            "nodes": self.nodes,
            "card": self.card.to_dict() if self.card else None,
        }

    def __str__(self) -> str:
        def tensors(items: tuple[TensorInfo, ...]) -> str:
            return ", ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in items)

        lines = [
            f"{self.path}  ({self.size_bytes / 1e6:.1f} MB, opset {self.opset}, "
            f"{self.parameters:,} parameters, "
            f"{self.nodes} nodes, producer {self.producer})",
            f"inputs:  {tensors(self.inputs)}",
            f"outputs: {tensors(self.outputs)}",
        ]
        if self.card is None:
            lines.append("model card: none (not exported by deploykit)")
        else:
            c = self.card
            pp = c.preprocess
            labels = ", ".join(c.labels[:5]) + (", ..." if len(c.labels) > 5 else "")
            lines += [
                f"model card: {c.name} ({c.task}, {c.precision}, {c.num_classes} classes: {labels})",
                f"  source: {c.source.kind} {c.source.name or c.source.path or ''} "
                f"weights={c.source.weights}",
                f"  preprocess: {pp.summary()}",
                f"  exporter: {c.exporter}, opset {c.opset}, created {c.created}",
                f"  fingerprint: {'yes' if c.fingerprint else 'no'}",
            ]
            if c.quantization:
                lines.append(f"  quantization: {dict(c.quantization)}")
        return "\n".join(lines)


_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
           11: "float64", 16: "bfloat16"}


def _tensor_info(value: Any) -> TensorInfo:
    t = value.type.tensor_type
    shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
    return TensorInfo(value.name, shape, _DTYPES.get(t.elem_type, str(t.elem_type)))


def inspect_model(path: str | Path) -> InspectResult:
    """Summarise an ONNX file; raise ``ModelFileError`` when it cannot be read."""
    import numpy as np

    path = Path(path)
    model = load_onnx(path, load_external_data=False)
    graph = model.graph
    initializer_names = {i.name for i in graph.initializer}
    parameters = sum(int(np.prod(i.dims)) if len(i.dims) else 1 for i in graph.initializer)
    metadata = {p.key: p.value for p in model.metadata_props}
    card = card_from_metadata(metadata, origin=str(path)) if CARD_KEY in metadata else None
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if not graph.output:
        raise ModelFileError(f"{str(path)!r} has no graph outputs; it is not a usable model.")
    return InspectResult(
        path=path,
        size_bytes=path.stat().st_size,
        opset=int(opset),
        ir_version=int(model.ir_version),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=tuple(_tensor_info(v) for v in graph.input if v.name not in initializer_names),
        outputs=tuple(_tensor_info(v) for v in graph.output),
        parameters=parameters,
        nodes=len(graph.node),
        card=card,
    )
