"""The model card: one JSON document inside the ONNX file that describes the model.

It is stored in the ONNX ``metadata_props`` under :data:`CARD_KEY`. ``export`` writes it; ``verify``,
``serve``, ``predict``, ``bench`` and ``package`` read it instead of asking the user about the model.
The schema is documented in ``docs/model-card.md``. This module never imports torch or onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deploykit.errors import ModelFileError

CARD_KEY = "deploykit.card"
SCHEMA_VERSION = 1
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor.

    The shorter side is resized to ``resize`` (aspect ratio kept, as torchvision's ``Resize(int)``), the centre
    ``crop`` x ``crop`` is cut out, pixels are scaled by ``scale`` then normalised with ``mean``/``std`` in
    ``channel_order``, and laid out as ``layout``. ``resize`` None means: resize straight to ``crop`` x ``crop``.
    """

    crop: int = 224
    resize: int | None = 256
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"

    def input_shape(self, batch: int | str = "batch") -> tuple[int | str, ...]:
        """The model input shape for one batch under this preprocessing."""
        if self.layout == "NCHW":
            return (batch, 3, self.crop, self.crop)
        return (batch, self.crop, self.crop, 3)

    def validate(self) -> None:
        """Raise ``ModelFileError`` naming the first invalid field."""
        problems = []
        if self.crop <= 0:
            problems.append(f"crop must be positive, got {self.crop}")
        if self.resize is not None and self.resize < self.crop:
            problems.append(f"resize ({self.resize}) must be at least crop ({self.crop})")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std must have 3 values each")
        if any(s == 0 for s in self.std):
            problems.append("std values must be non-zero")
        if self.channel_order not in ("RGB", "BGR"):
            problems.append(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            problems.append(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if problems:
            raise ModelFileError("Invalid preprocessing in model card: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a model input or output; a ``str`` dimension is symbolic (``"batch"``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and isinstance(self.shape[0], str)


@dataclass(frozen=True)
class Source:
    """Where the PyTorch model came from, so that ``verify`` can rebuild it.

    ``kind`` is one of ``torchvision``, ``checkpoint``, ``torchscript``, ``pickle``, ``factory``, ``onnx``.
    ``weights`` is the resolved weights enum name (``IMAGENET1K_V1``), ``none`` (random init from ``seed``),
    or ``file`` (a state dict at ``path``, whose digest is ``sha256``).
    """

    kind: str
    name: str | None = None
    arch: str | None = None
    weights: str | None = None
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class Fingerprint:
    """A compact record of the reference outputs for a seeded input, checkable without torch.

    The input is ``numpy.random.default_rng(seed).standard_normal(shape, dtype=float32)`` with ``shape`` the
    input shape at ``batch``. ``indices`` are flat positions into the first output, ``values`` the reference
    values there, ``topk`` the reference top-k class indices per row.
    """

    seed: int
    batch: int
    indices: tuple[int, ...]
    values: tuple[float, ...]
    topk: tuple[tuple[int, ...], ...]
    atol: float
    rtol: float
    reference: str = "pytorch"


@dataclass(frozen=True)
class ModelCard:
    """The contract stored inside every ONNX file deploykit writes."""

    name: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: Source
    task: str = "image-classification"
    output_kind: str = "logits"
    precision: str = "fp32"
    exporter: str = ""
    opset: int = 0
    versions: Mapping[str, str] = field(default_factory=dict)
    created: str = ""
    fingerprint: Fingerprint | None = None
    parity: Mapping[str, Any] | None = None
    quantization: Mapping[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def dynamic_batch(self) -> bool:
        return self.input.dynamic_batch

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def replace(self, **changes: Any) -> ModelCard:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["versions"] = dict(self.versions)
        data["parity"] = dict(self.parity) if self.parity is not None else None
        data["quantization"] = dict(self.quantization) if self.quantization is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Build a card from its JSON form; raise ``ModelFileError`` naming what is wrong."""
        try:
            version = int(data.get("schema_version", 0))
            if version > SCHEMA_VERSION:
                raise ModelFileError(
                    f"Model card schema version {version} is newer than this deploykit understands "
                    f"({SCHEMA_VERSION}).",
                    hint="Upgrade deploykit: pip install -U deploykit",
                )
            pp = data["preprocess"]
            preprocess = Preprocess(
                crop=int(pp["crop"]),
                resize=None if pp.get("resize") is None else int(pp["resize"]),
                interpolation=str(pp.get("interpolation", "bilinear")),
                mean=tuple(float(v) for v in pp["mean"]),
                std=tuple(float(v) for v in pp["std"]),
                scale=float(pp.get("scale", 1.0 / 255.0)),
                channel_order=str(pp.get("channel_order", "RGB")),
                layout=str(pp.get("layout", "NCHW")),
                dtype=str(pp.get("dtype", "float32")),
            )
            fp = data.get("fingerprint")
            fingerprint = (
                Fingerprint(
                    seed=int(fp["seed"]),
                    batch=int(fp["batch"]),
                    indices=tuple(int(i) for i in fp["indices"]),
                    values=tuple(float(v) for v in fp["values"]),
                    topk=tuple(tuple(int(i) for i in row) for row in fp["topk"]),
                    atol=float(fp["atol"]),
                    rtol=float(fp["rtol"]),
                    reference=str(fp.get("reference", "pytorch")),
                )
                if fp
                else None
            )
            card = cls(
                name=str(data["name"]),
                labels=tuple(str(label) for label in data["labels"]),
                preprocess=preprocess,
                inputs=tuple(_tensor(t) for t in data["inputs"]),
                outputs=tuple(_tensor(t) for t in data["outputs"]),
                source=Source(**{k: data["source"].get(k) for k in Source.__dataclass_fields__}),
                task=str(data.get("task", "image-classification")),
                output_kind=str(data.get("output_kind", "logits")),
                precision=str(data.get("precision", "fp32")),
                exporter=str(data.get("exporter", "")),
                opset=int(data.get("opset", 0)),
                versions=dict(data.get("versions") or {}),
                created=str(data.get("created", "")),
                fingerprint=fingerprint,
                parity=data.get("parity"),
                quantization=data.get("quantization"),
                schema_version=version or SCHEMA_VERSION,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"Invalid model card: bad or missing field {exc}.") from exc
        preprocess.validate()
        if not card.inputs or not card.outputs:
            raise ModelFileError("Invalid model card: it lists no inputs or no outputs.")
        return card

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"Model card is not valid JSON: {exc}.") from exc
        if not isinstance(data, dict):
            raise ModelFileError("Model card is not a JSON object.")
        return cls.from_dict(data)


def _tensor(data: Mapping[str, Any]) -> TensorSpec:
    shape = tuple(d if isinstance(d, str) else int(d) for d in data["shape"])
    return TensorSpec(name=str(data["name"]), shape=shape, dtype=str(data.get("dtype", "float32")))


def card_from_metadata(metadata: Mapping[str, str], *, origin: str = "model") -> ModelCard:
    """Read the card from an ONNX metadata map (``onnxruntime``'s ``custom_metadata_map`` or ``metadata_props``)."""
    text = metadata.get(CARD_KEY)
    if text is None:
        raise ModelFileError(
            f"{origin} has no deploykit model card (metadata key {CARD_KEY!r}).",
            hint="Export it with `deploykit export`, or pass the model description explicitly.",
        )
    return ModelCard.from_json(text)


def read_card(path: str | Path) -> ModelCard:
    """Read the model card of an ONNX file without loading external weight data."""
    model = load_onnx(path, load_external_data=False)
    return card_from_metadata({p.key: p.value for p in model.metadata_props}, origin=str(path))


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> Any:
    """Load an ONNX ``ModelProto``; raise ``ModelFileError`` with a clear reason when that fails."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ONNX file {str(path)!r} does not exist.", hint="Check the path.")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"{str(path)!r} is not a readable ONNX file ({type(exc).__name__}).",
            hint="It may be truncated or corrupt: export it again.",
        ) from exc


def write_card(model: Any, card: ModelCard) -> None:
    """Store ``card`` in ``model.metadata_props`` (an ``onnx.ModelProto``), replacing any earlier card."""
    card.preprocess.validate()
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != CARD_KEY]
    del model.metadata_props[:]
    for key, value in kept:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card.to_json()
