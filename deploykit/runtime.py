"""ONNX Runtime: the one place that builds inference sessions, and the ``Predictor`` (arrays in, top-k out).

Never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.card import ModelCard, card_from_metadata
from deploykit.errors import ModelFileError, UsageError, one_line

if TYPE_CHECKING:
    # NumPy is imported where it is used: `deploykit predict` against a server needs only Prediction.
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


@dataclass(frozen=True)
class SessionOptions:
    """Knobs for an ONNX Runtime session. ``None`` threads means ONNX Runtime's default (one per core).

    ``allow_spinning`` False stops idle worker threads from busy-waiting, which matters when inference shares
    cores with request handling in a server. ``stop_spinning_after_run`` keeps spinning within a call (no
    wake-up between its parallel sections) but stops it as soon as the last concurrent call returns.
    """

    providers: tuple[str, ...] = ("cpu",)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool = True
    stop_spinning_after_run: bool = False
    optimization: str = "all"
    optimized_model_path: str | None = None


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def provider_name(name: str) -> str:
    """ONNX Runtime's name for a provider given by its short name (``cpu``, ``cuda``) or its full name."""
    return PROVIDER_ALIASES.get(name.lower(), name)


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """Map short names (``cpu``, ``cuda``) to ONNX Runtime provider names and check they are available."""
    available = available_providers()
    resolved = []
    for name in requested:
        full = provider_name(name)
        if full not in available:
            raise UsageError(
                f"Requested provider {name!r} ({full}) is not available; available providers are "
                f"{', '.join(available)}.",
                hint="Install the matching onnxruntime package (e.g. onnxruntime-gpu) "
                "or choose another --provider.",
            )
        resolved.append(full)
    return resolved


def create_session(model: str | Path | bytes, options: SessionOptions | None = None) -> ort.InferenceSession:
    """Build an ``onnxruntime.InferenceSession``; raise ``ModelFileError`` when the model cannot load."""
    import onnxruntime as ort

    options = options or SessionOptions()
    so = ort.SessionOptions()
    if options.intra_op_threads is not None:
        so.intra_op_num_threads = options.intra_op_threads
    if options.inter_op_threads is not None:
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if not options.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif options.stop_spinning_after_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.optimization]
    if options.optimized_model_path:
        so.optimized_model_filepath = options.optimized_model_path
    so.log_severity_level = 3
    providers = resolve_providers(options.providers)
    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ModelFileError(f"ONNX file {str(model)!r} does not exist.", hint="Check the path.")
        source: str | bytes = os.fspath(model)
    else:
        source = model
    try:
        return ort.InferenceSession(source, sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph/InvalidProtobuf errors
        if type(exc).__module__.startswith("onnxruntime"):
            label = str(model) if isinstance(model, (str, Path)) else "the model"
            raise ModelFileError(
                f"ONNX Runtime cannot load {label!r}: {one_line(exc)}.",
                hint="The file may be corrupt or use operators this onnxruntime does not support.",
            ) from exc
        raise


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    import numpy as np

    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def pad_batch(batch: np.ndarray, size: int | None) -> np.ndarray:
    """``batch`` padded with zero rows to ``size`` rows, for a static-batch model (``size`` None: unchanged).

    The caller keeps the first ``len(batch)`` rows of the output.
    """
    import numpy as np

    if size is None or len(batch) >= size:
        return batch
    padding = np.zeros((size - len(batch), *batch.shape[1:]), dtype=batch.dtype)
    return np.concatenate([batch, padding])


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer."""

    index: int
    label: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "probability": self.probability}


def top_k(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[list[Prediction]]:
    """Top-k classes per row of a (N, C) probability array, highest first."""
    import numpy as np

    k = max(1, min(k, probabilities.shape[-1]))
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [
        [
            Prediction(int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), float(row[int(i)]))
            for i in idx
        ]
        for row, idx in zip(probabilities, order, strict=True)
    ]


class Predictor:
    """An ONNX model with its card: run raw batches, or images to top-k predictions."""

    def __init__(self, session: ort.InferenceSession, card: ModelCard, *, name: str | None = None,
                 path: str | None = None) -> None:
        self.session = session
        self.card = card
        self.name = name or card.name
        self.path = path
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def open(cls, path: str | Path, options: SessionOptions | None = None, *, name: str | None = None,
             card: ModelCard | None = None) -> Predictor:
        """Load an ONNX file and its card (from the session's metadata unless ``card`` is given)."""
        session = create_session(path, options)
        if card is None:
            card = card_from_metadata(session.get_modelmeta().custom_metadata_map, origin=str(path))
        return cls(session, card, name=name, path=str(path))

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """All outputs for one input batch."""
        return list(self.session.run(self.output_names, {self.input_name: batch}))

    def first_output(self, batch: np.ndarray) -> np.ndarray:
        """The first output for one input batch."""
        return self.run(batch)[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for one input batch."""
        return self.to_probabilities(self.first_output(batch))

    def to_probabilities(self, output: np.ndarray) -> np.ndarray:
        import numpy as np

        output = output.astype(np.float32, copy=False)
        return softmax(output) if self.card.output_kind == "logits" else output

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        from deploykit.images import preprocess_batch

        return preprocess_batch(images, self.card.preprocess)

    def predict(self, batch: np.ndarray, k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions per row of an input batch."""
        return top_k(self.probabilities(batch), k, self.card.labels)

    def predict_images(self, images: Sequence[Image.Image], k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for decoded RGB images, preprocessed as the card says."""
        return self.predict(self.preprocess(images), k)

    def describe(self) -> Mapping[str, Any]:
        return {"name": self.name, "path": self.path, "card": self.card.to_dict()}
