"""The model card: one JSON document inside the ONNX file that describes the model.

It is stored in the ONNX ``metadata_props`` under :data:`CARD_KEY`. ``export`` writes it; ``verify``,
``serve``, ``predict``, ``bench`` and ``package`` read it instead of asking the user about the model.
The schema is documented in ``docs/model-card.md``. This module never imports torch or onnxruntime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deploykit.errors import ModelFileError

CARD_KEY = "deploykit.card"
SCHEMA_VERSION = 2
#: The channel orders an input of each channel count can have; the first is the default.
CHANNEL_ORDERS: dict[int, tuple[str, ...]] = {1: ("L",), 3: ("RGB", "BGR")}

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
DTYPES = ("float32", "float16")


def default_channel_order(channels: int) -> str:
    """``L`` for one channel, ``RGB`` for three (and for a count that validation then refuses)."""
    return CHANNEL_ORDERS.get(channels, ("RGB",))[0]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor.

    The image is converted to ``channel_order`` (``L``: one grayscale channel, by Pillow's ITU-R 601 luma
    weights as torchvision's ``Grayscale``). Then its shorter side is resized to ``resize`` (aspect ratio
    kept, as torchvision's ``Resize(int)``) and the centre ``height`` x ``width`` is cut out (zero-padded
    where the resized image is smaller, as ``CenterCrop``); ``resize`` None means: resize straight to
    ``height`` x ``width`` (``Resize((h, w))``). Pixels (0..255) are multiplied by ``scale`` (1/255: 0..1;
    1: 0..255), normalised with one ``mean``/``std`` value per channel, and laid out as ``layout``.
    """

    height: int = 224
    width: int = 224
    resize: int | None = 256
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    channels: int = 3
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"

    def summary(self) -> str:
        """One line for people: ``RGB, shorter side 256, centre crop 224x224, bilinear, pixels 0..1, ...``."""
        geometry = (f"resize to {self.height}x{self.width}" if self.resize is None
                    else f"shorter side {self.resize}, centre crop {self.height}x{self.width}")
        pixels = ("0..1" if math.isclose(self.scale, 1 / 255) else "0..255" if self.scale == 1
                  else f"0..255 x {self.scale:g}")
        return (f"{self.channel_order}, {geometry}, {self.interpolation}, pixels {pixels}, "
                f"mean {list(self.mean)}, std {list(self.std)}, {self.layout}")

    def input_shape(self, batch: int | str = "batch") -> tuple[int | str, ...]:
        """The model input shape for one batch under this preprocessing."""
        if self.layout == "NCHW":
            return (batch, self.channels, self.height, self.width)
        return (batch, self.height, self.width, self.channels)

    def validate(self) -> None:
        """Raise ``ModelFileError`` naming the first invalid field."""
        problems = []
        if self.height <= 0 or self.width <= 0:
            problems.append(f"height and width must be positive, got {self.height}x{self.width}")
        if self.resize is not None and self.resize < min(self.height, self.width):
            problems.append(f"resize ({self.resize}) must be at least the smaller of height and width "
                            f"({min(self.height, self.width)})")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                            f"got {self.interpolation!r}")
        if self.channels not in CHANNEL_ORDERS:
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        elif self.channel_order not in CHANNEL_ORDERS[self.channels]:
            problems.append(f"channel_order of a {self.channels}-channel input must be "
                            f"{' or '.join(CHANNEL_ORDERS[self.channels])}, got {self.channel_order!r}")
        elif len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append(f"mean and std must have {self.channels} value{'s' if self.channels > 1 else ''} "
                            f"each (one per channel), got {len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            problems.append(f"mean and std must be finite numbers, got mean {list(self.mean)}, "
                            f"std {list(self.std)}")
        if any(s == 0 for s in self.std):
            problems.append("std values must be non-zero")
        if self.layout not in ("NCHW", "NHWC"):
            problems.append(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            problems.append(f"scale must be positive, got {self.scale}")
        if problems:
            raise ModelFileError("Invalid preprocessing in model card: " + "; ".join(problems) + ".")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "preprocess") -> Preprocess:
        """Read the card's ``preprocess`` object (or a factory's ``deploykit_meta['preprocess']``), validated.

        Schema 1's square ``crop`` is read as ``height`` and ``width``; a one-channel input defaults to the
        ``L`` channel order.
        """
        crop = _field(data, "crop", int, default=None, where=where)  # schema 1: a square input
        size_default = _REQUIRED if crop is None else crop
        height = _field(data, "height", int, default=size_default, where=where)
        width = _field(data, "width", int, default=size_default, where=where)
        channels = _field(data, "channels", int, default=3, where=where)
        pp = cls(
            height=height,
            width=width,
            resize=_field(data, "resize", int, default=None, where=where),
            interpolation=_field(data, "interpolation", str, default="bilinear", where=where),
            mean=_field(data, "mean", _floats, where=where),
            std=_field(data, "std", _floats, where=where),
            scale=_field(data, "scale", float, default=1.0 / 255.0, where=where),
            channels=channels,
            channel_order=_field(data, "channel_order", str, default=default_channel_order(channels),
                                 where=where),
            layout=_field(data, "layout", str, default="NCHW", where=where),
            dtype=_field(data, "dtype", str, default="float32", where=where),
        )
        pp.validate()
        return pp


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

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a static-batch model takes (``--static-batch``); None when the batch is dynamic."""
        first = self.input.shape[0] if self.input.shape else None
        return first if isinstance(first, int) else None

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def replace(self, **changes: Any) -> ModelCard:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The card as plain JSON types (lists, not tuples), equal to its own JSON round trip."""
        data = asdict(self)
        data["versions"] = dict(self.versions)
        data["parity"] = dict(self.parity) if self.parity is not None else None
        data["quantization"] = dict(self.quantization) if self.quantization is not None else None
        plain: dict[str, Any] = _plain(data)
        return plain

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Build a card from its JSON form; raise ``ModelFileError`` naming the field that is wrong."""
        if not isinstance(data, Mapping):
            raise ModelFileError("Invalid model card: it is not a JSON object.")
        version = _field(data, "schema_version", int, default=1)
        if version > SCHEMA_VERSION:
            raise ModelFileError(
                f"Model card schema version {version} is newer than this deploykit understands "
                f"({SCHEMA_VERSION}).",
                hint="Upgrade deploykit: pip install -U deploykit",
            )
        preprocess = Preprocess.from_dict(_section(data, "preprocess"))
        fp = data.get("fingerprint")
        fingerprint = None
        if fp is not None:
            fp = _section(data, "fingerprint")
            fingerprint = Fingerprint(
                seed=_field(fp, "seed", int, where="fingerprint"),
                batch=_field(fp, "batch", int, where="fingerprint"),
                indices=_field(fp, "indices", lambda v: tuple(int(i) for i in v), where="fingerprint"),
                values=_field(fp, "values", _floats, where="fingerprint"),
                topk=_field(fp, "topk", lambda v: tuple(tuple(int(i) for i in row) for row in v),
                            where="fingerprint"),
                atol=_field(fp, "atol", float, where="fingerprint"),
                rtol=_field(fp, "rtol", float, where="fingerprint"),
                reference=_field(fp, "reference", str, default="pytorch", where="fingerprint"),
            )
        source = _section(data, "source")
        card = cls(
            name=_field(data, "name", str),
            labels=_field(data, "labels", lambda v: tuple(str(label) for label in _list(v))),
            preprocess=preprocess,
            inputs=_field(data, "inputs", lambda v: tuple(_tensor(t) for t in _list(v))),
            outputs=_field(data, "outputs", lambda v: tuple(_tensor(t) for t in _list(v))),
            source=Source(
                kind=_field(source, "kind", str, where="source"),
                **{k: _field(source, k, int if k in ("seed", "num_classes") else str, default=None,
                             where="source") for k in Source.__dataclass_fields__ if k != "kind"},
            ),
            task=_field(data, "task", str, default="image-classification"),
            output_kind=_field(data, "output_kind", str, default="logits"),
            precision=_field(data, "precision", str, default="fp32"),
            exporter=_field(data, "exporter", str, default=""),
            opset=_field(data, "opset", int, default=0),
            versions=_field(data, "versions", lambda v: {str(k): str(x) for k, x in v.items()}, default={}),
            created=_field(data, "created", str, default=""),
            fingerprint=fingerprint,
            parity=_field(data, "parity", dict, default=None),
            quantization=_field(data, "quantization", dict, default=None),
            schema_version=SCHEMA_VERSION,  # an older card is converted as it is read
        )
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


_REQUIRED = object()


def _plain(value: Any) -> Any:
    """Tuples to lists and mappings to dicts, recursively; non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _field(data: Mapping[str, Any], key: str, convert: Callable[[Any], Any], *, default: Any = _REQUIRED,
           where: str = "") -> Any:
    """``convert(data[key])``, or ``default`` when it is absent or null; errors name the field."""
    name = f"{where}.{key}" if where else key
    value = data.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelFileError(f"Invalid model card: missing field {name!r}.")
        return default
    try:
        return convert(value)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"Invalid model card: field {name!r} has an invalid value {value!r:.80}.") \
            from exc


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """A required nested object of the card."""
    value = _field(data, key, lambda v: v)
    if not isinstance(value, Mapping):
        raise ModelFileError(f"Invalid model card: field {key!r} must be an object, "
                             f"got {type(value).__name__}.")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise TypeError("expected a list")
    return list(value)


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in _list(value))


def _tensor(data: Mapping[str, Any]) -> TensorSpec:
    shape = tuple(d if isinstance(d, str) else int(d) for d in _list(data["shape"]))
    return TensorSpec(name=str(data["name"]), shape=shape, dtype=str(data.get("dtype", "float32")))


def card_from_metadata(metadata: Mapping[str, str], *, origin: str = "model") -> ModelCard:
    """Read the card from an ONNX metadata map (``custom_metadata_map`` of onnxruntime, or metadata_props)."""
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
