"""MODEL specs to PyTorch modules: torchvision names, checkpoints, TorchScript, pickles and factories.

``resolve_source`` turns what the user typed into a :class:`LoadedModel` (the module plus what the card needs
to know about it); ``rebuild_source`` rebuilds it from the card's :class:`~deploykit.card.Source` for verify.
torch is imported only here, in export.py and in verify.py.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import io
import socket
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.card import Preprocess, Source, default_channel_order
from deploykit.errors import (
    DeployKitError,
    MissingExtraError,
    ModelFileError,
    ModelNotFoundError,
    UsageError,
    WeightsUnavailableError,
    one_line,
    require,
)
from deploykit.files import sha256_file

if TYPE_CHECKING:
    import torch

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
DEFAULT_SEED = 0


#: What to do about a source geometry that no card resize mode reproduces (``LoadedModel.geometry_problem``).
GEOMETRY_HINT = ("Choose the geometry: --resize-mode exact (straight to the input size) or --resize N (the "
                 "shorter side, then the centre crop), with --input-size HxW for another input size.")


@dataclass
class LoadedModel:
    """A PyTorch module in eval mode and what the model card records about it."""

    module: torch.nn.Module
    name: str
    source: Source
    labels: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    output_kind: str = "logits"
    #: Why ``preprocess``'s resize and crop are not the source's own (a geometry no card resize mode
    #: reproduces); export raises it unless the options choose one (``--resize-mode`` or ``--resize``).
    geometry_problem: UsageError | None = None


def _torch() -> Any:
    require("torch", "torch")
    require("torchvision", "torch")
    try:
        import torch
        import torchvision  # noqa: F401  (checked here so a broken install gives the same one-line error)
    except ImportError as exc:  # present but not importable (a broken or partial install)
        missing = "torchvision" if "torchvision" in str(exc) else "torch"
        raise MissingExtraError(missing, "torch") from exc
    return torch


def classification_models() -> list[str]:
    """Names of torchvision's image classification models."""
    _torch()
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def resolve_source(spec: str, *, arch: str | None = None, weights: str | None = "DEFAULT",
                   trust_pickle: bool = False, seed: int = DEFAULT_SEED,
                   num_classes: int | None = None) -> LoadedModel:
    """Resolve a MODEL spec to a module.

    Args:
        spec: a torchvision model name, ``timm:NAME``, ``hf:ORG/NAME`` or a Transformers ``save_pretrained``
            folder, a checkpoint or TorchScript file, or a factory ``pkg.mod:fn`` / ``path/file.py:fn``.
        arch: the architecture (torchvision name or factory) for a state-dict checkpoint.
        weights: for torchvision and timm names: ``DEFAULT``, an enum name (torchvision), ``none`` or a
            state-dict path.
        trust_pickle: allow unpickling a full model object (runs code from the file).
        seed: the seed for random initialisation when ``weights`` is ``none``.
        num_classes: timm and Hugging Face: the class count of a fine-tuned head.

    Raises:
        ModelNotFoundError, UsageError, WeightsUnavailableError, MissingExtraError.
    """
    if num_classes is not None and num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {num_classes}.")
    if spec.startswith(TIMM_PREFIX):
        return _from_timm(spec[len(TIMM_PREFIX):], weights=weights, seed=seed, num_classes=num_classes)
    path = Path(spec)
    if spec.startswith(HF_PREFIX) or is_hf_folder(path):
        return _from_hf(spec, weights=weights, num_classes=num_classes, seed=seed)
    if path.is_dir():
        raise ModelNotFoundError(f"{spec!r} is a folder without config.json, so not a Hugging Face "
                                 "save_pretrained folder.",
                                 hint="Pass the folder save_pretrained wrote, or a model file.")
    if num_classes is not None:
        raise UsageError("--num-classes applies to timm: and Hugging Face models only.",
                         hint="A torchvision --weights PATH or checkpoint brings its own class count.")
    torch = _torch()
    if ":" in spec and not path.exists() and not (len(spec) > 1 and spec[1] == ":" and path.suffix):
        return _from_factory(spec, weights=weights, seed=seed)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or path.exists():
        if not path.is_file():
            raise ModelNotFoundError(f"Checkpoint {spec!r} does not exist.", hint="Check the path.")
        return _from_file(path, arch=arch, trust_pickle=trust_pickle, seed=seed)
    names = classification_models()
    if spec not in names:
        raise ModelNotFoundError(
            f"Unknown model {spec!r}.{suggest(spec, names)}",
            hint="See `deploykit export --list` for torchvision names, or pass a checkpoint file or "
            "a factory like package.module:function.",
        )
    del torch
    return _from_torchvision(spec, weights=weights, seed=seed)


def _weights_enum(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name)


def _preprocess_from_weights(weights: Any) -> Preprocess:
    """Read crop/resize/mean/std/interpolation from a torchvision weights' transforms preset."""
    transform = weights.transforms()
    crop = int(_first(getattr(transform, "crop_size", 224)))
    resize = getattr(transform, "resize_size", None)
    interpolation = getattr(transform, "interpolation", None)
    return Preprocess(
        height=crop,
        width=crop,
        resize=int(_first(resize)) if resize is not None else None,
        interpolation=str(getattr(interpolation, "value", "bilinear")),
        mean=tuple(float(v) for v in getattr(transform, "mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in getattr(transform, "std", (0.229, 0.224, 0.225))),
    )


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _from_torchvision(name: str, *, weights: str | None, seed: int) -> LoadedModel:
    torch = _torch()
    import torchvision

    enum = _weights_enum(name)
    default = enum.DEFAULT
    choice = (weights or "none").strip()
    if choice.lower() == "none":
        torch.manual_seed(seed)
        # inception/googlenet warn unless init_weights is explicit; True is their default for weights=None.
        kwargs = {"init_weights": True} if name in ("inception_v3", "googlenet") else {}
        module = torchvision.models.get_model(name, weights=None, **kwargs)
        source = Source(kind="torchvision", name=name, weights="none", seed=seed)
        meta_weights = default
    elif Path(choice).suffix.lower() in CHECKPOINT_SUFFIXES or Path(choice).is_file():
        state = _load_state_dict(Path(choice))
        module = _build_fitting(lambda **kw: torchvision.models.get_model(name, weights=None, **kw), state,
                                name, Path(choice), target=name)
        source = Source(kind="torchvision", name=name, weights="file", path=str(Path(choice).resolve()),
                        sha256=sha256_file(choice))
        meta_weights = default
    else:
        meta_weights = _pick_weights(enum, choice, name)
        state = _fetch_weights(meta_weights, name)
        module = torchvision.models.get_model(name, weights=None, **_weights_kwargs(name, meta_weights))
        try:
            module.load_state_dict(state)
        except Exception as exc:  # RuntimeError for keys and shapes; a module's own check raises any type
            raise WeightsUnavailableError(
                f"The cached weights for {name}.{meta_weights.name} do not fit the model: "
                f"{_mismatch(module, state) or one_line(exc, with_type=True)}.",
                hint=f"Delete {_cache_file(meta_weights)} to download it again, or use --weights none or "
                "PATH.",
            ) from exc
        source = Source(kind="torchvision", name=name, weights=meta_weights.name)
    module.eval()
    categories = list(meta_weights.meta.get("categories") or [])
    # A fine-tuned state dict (--weights PATH) may have another class count: then the names do not apply.
    classes = _num_classes(module.state_dict())
    labels = categories if categories and (classes is None or classes == len(categories)) else None
    return LoadedModel(module=module, name=name, source=source, labels=labels,
                       preprocess=_preprocess_from_weights(meta_weights))


def _pick_weights(enum: Any, choice: str, name: str) -> Any:
    if choice.upper() == "DEFAULT":
        return enum.DEFAULT
    names = [w.name for w in enum]
    key = choice.split(".")[-1]
    if key not in names:
        raise UsageError(
            f"Unknown weights {choice!r} for {name}; available: {', '.join(names)}.",
            hint="Use --weights DEFAULT, one of those names, none, or a state-dict path.",
        )
    return enum[key]


def _weights_kwargs(name: str, weights: Any) -> dict[str, Any]:
    """Keyword arguments torchvision passes when it builds a model for these weights (num_classes etc.)."""
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if name.startswith("inception") or name.startswith("googlenet"):
        kwargs.update(aux_logits=True, transform_input=True, init_weights=False)
    return kwargs


DOWNLOAD_TIMEOUT = 30.0  # seconds without progress before a weights download gives up


def _cache_file(weights: Any) -> Path:
    """Where torch's hub cache keeps (or would keep) the file of these torchvision weights."""
    torch = _torch()
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _fetch_weights(weights: Any, name: str) -> dict[str, Any]:
    """Load pretrained weights through torchvision's API and torch's hub cache; clear error when offline.

    torch.hub checks the sha256 prefix in the file name only when it downloads; a file already in the cache
    is trusted and loaded as is (so a state dict placed there by hand works offline).
    """
    cache = _cache_file(weights)
    if cache.is_file():
        try:
            return _state_of(weights.get_state_dict(progress=False, check_hash=True))
        except Exception as exc:  # torch.load raises RuntimeError, UnpicklingError, EOFError... on a bad file
            raise WeightsUnavailableError(
                f"The cached weights file {str(cache)!r} cannot be read ({one_line(exc, with_type=True)}).",
                hint="Delete it to download it again, or use --weights none or --weights PATH.",
            ) from exc
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # urllib has no timeout by default: a firewalled host hangs
    try:
        # torch.hub prints "Downloading: ..." on stdout, which may carry --json.
        with contextlib.redirect_stdout(io.StringIO()):
            return _state_of(weights.get_state_dict(progress=False, check_hash=True))
    except (OSError, RuntimeError) as exc:  # URLError/timeouts are OSErrors; a bad hash is a RuntimeError
        if isinstance(exc, RuntimeError) and "hash" not in str(exc).lower():
            raise
        reason = "the download did not match its hash" if isinstance(exc, RuntimeError) else one_line(exc)
        raise WeightsUnavailableError(
            f"Pretrained weights {name}.{weights.name} are not cached and could not be downloaded "
            f"({reason}).",
            hint=f"Use --weights none for random weights, --weights PATH for a state dict, or place "
            f"{cache.name} in {cache.parent} (torch's hub cache; set TORCH_HOME to move it).",
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _state_of(state: Any) -> dict[str, Any]:
    """A state dict from a loader as a dict of its own, its ``_metadata`` (module versions) kept."""
    return _with_metadata(dict(state), getattr(state, "_metadata", None))


def _load_state_dict(path: Path) -> dict[str, Any]:
    torch = _torch()
    if not path.is_file():
        raise ModelNotFoundError(f"Weights file {str(path)!r} does not exist.", hint="Check the path.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zip errors...
        raise UsageError(
            f"{str(path)!r} is not a readable state dict ({one_line(exc, with_type=True)}).",
            hint="It may be truncated or corrupt, or a full pickled model (then pass it as MODEL with "
            "--trust-pickle).",
        ) from exc
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The mapping of parameter names to tensors inside a checkpoint, with its ``_metadata`` kept.

    ``torch.save(model.state_dict())`` stores each module's version in ``_metadata``; modules whose
    ``_load_from_state_dict`` reads it (MNASNet, BatchNorm's older layouts) fail or load wrongly without it.
    """
    torch = _torch()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return _with_metadata({k.removeprefix("module."): v for k, v in tensors.items()},
                                  getattr(obj, "_metadata", None), strip="module")
    raise UsageError(f"{str(path)!r} holds no state dict (a mapping of parameter names to tensors).")


def _with_metadata(tensors: dict[str, Any], metadata: Any, *, strip: str = "") -> dict[str, Any]:
    """``tensors`` as an OrderedDict carrying ``metadata`` (module versions), its keys stripped like theirs.

    A DataParallel wrapper's entries are ``module`` and ``module.x``; they become ``""`` and ``x``, and win
    over the wrapper's own root entry.
    """
    state: OrderedDict[str, Any] = OrderedDict(tensors)
    if isinstance(metadata, dict):
        kept: OrderedDict[str, Any] = OrderedDict()
        for key, value in metadata.items():
            if strip and (key == strip or key.startswith(strip + ".")):
                kept[key[len(strip) + 1:]] = value
            else:
                kept.setdefault(key, value)
        state._metadata = kept  # type: ignore[attr-defined]
    return state


def _load_into(module: Any, state: dict[str, Any], *, what: str, hint: str) -> None:
    """``module.load_state_dict(state)`` (strict); any failure becomes one ``UsageError`` line.

    ``what`` names the file and the target ("The state dict 'x.pt' does not fit --arch resnet18"); the
    message goes on with the missing/unexpected keys and shape mismatches, or the module's own message when
    those match (a module that checks versions or values itself raises what it likes).
    """
    try:
        module.load_state_dict(state)
    except Exception as exc:  # RuntimeError for keys and shapes; a module's own check raises any type
        mismatch = _mismatch(module, state)
        reason = mismatch if mismatch else one_line(exc, with_type=True)
        raise UsageError(f"{what}: {reason}.", hint=hint) from exc


def _mismatch(module: Any, state: dict[str, Any], limit: int = 3) -> str:
    """Why ``state`` does not load into ``module``: missing/unexpected keys and shape differences, briefly.

    Empty when the keys and shapes match (then the module's own check failed).
    """
    expected = module.state_dict()

    def some(keys: list[str]) -> str:
        shown = ", ".join(keys[:limit])
        return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) ({some(shapes)})")
    return "; ".join(parts)


def _num_classes(state: dict[str, Any]) -> int | None:
    """Classes of the final linear layer: the last 2-D weight that is not an auxiliary head."""
    candidates = [k for k, v in state.items()
                  if k.endswith("weight") and v.ndim == 2 and "aux" not in k.lower()]
    return int(state[candidates[-1]].shape[0]) if candidates else None


def _build_fitting(build: Any, state: dict[str, Any], arch: str, path: Path, *,
                   target: str | None = None) -> torch.nn.Module:
    """Build ``arch`` with the class count the state dict implies and load it strictly.

    ``target`` is how the message names the architecture (default ``--arch ARCH``).
    """
    num_classes = _num_classes(state)
    kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes else {}
    if arch.startswith(("inception", "googlenet")):
        kwargs.update(aux_logits=any("aux" in k.lower() for k in state), init_weights=False)
    try:
        module = build(**kwargs)
    except TypeError:
        module = build()
    _load_into(module, state, what=f"The state dict {str(path)!r} does not fit {target or '--arch ' + arch}",
               hint="Pass the architecture the checkpoint was trained with.")
    return module


def _from_file(path: Path, *, arch: str | None, trust_pickle: bool, seed: int) -> LoadedModel:
    torch = _torch()
    digest = sha256_file(path)
    name = path.stem
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise UsageError(f"{str(path)!r} is not a loadable TorchScript file: {one_line(exc)}.") from exc
        module.eval()
        source = Source(kind="torchscript", path=str(path.resolve()), sha256=digest)
        return LoadedModel(module=module, name=name, source=source)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError for objects, RuntimeError/EOFError for damage
        # Only "Unsupported global" means a pickled object; other weights_only failures (an unknown opcode,
        # a bad load key) are damaged or foreign files, and --trust-pickle would not help.
        if "Unsupported global" in str(exc):
            if not trust_pickle:
                raise UsageError(
                    f"{str(path)!r} is a pickled model object, not a state dict. Unpickling runs code "
                    "stored in the file.",
                    hint="Only if you trust its origin, pass --trust-pickle; better, save a state dict "
                    "(torch.save(model.state_dict(), ...)) and pass --arch.",
                ) from exc
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False)
            except (ImportError, AttributeError) as inner:  # the pickled classes are not importable here
                raise UsageError(
                    f"{str(path)!r} cannot be unpickled: {one_line(inner)}.",
                    hint="The model's class must be importable (run from its project folder or install it).",
                ) from inner
        else:
            raise UsageError(
                f"{str(path)!r} is not a readable checkpoint ({one_line(exc, with_type=True)}).",
                hint="It may be truncated or corrupt.",
            ) from exc
    if isinstance(obj, torch.nn.Module):
        obj.eval()
        loaded = LoadedModel(module=obj, name=name, source=Source(kind="pickle", path=str(path.resolve()),
                                                                  sha256=digest))
        return _apply_meta(loaded, obj)
    state = _unwrap_state_dict(obj, path)
    if not arch:
        raise UsageError(
            f"{str(path)!r} is a state dict; it needs the architecture it belongs to.",
            hint="Pass --arch NAME (a torchvision model name such as resnet18, or a factory "
            "pkg.module:function).",
        )
    if ":" in arch:
        base = _from_factory(arch, weights="none", seed=seed, state=state, state_path=path)
        return LoadedModel(module=base.module, name=name,
                           source=Source(kind="checkpoint", arch=arch, weights="file",
                                         path=str(path.resolve()), sha256=digest,
                                         num_classes=_num_classes(state)),
                           labels=base.labels, preprocess=base.preprocess, output_kind=base.output_kind)
    import torchvision

    names = classification_models()
    if arch not in names:
        raise ModelNotFoundError(f"Unknown --arch {arch!r}.{suggest(arch, names)}",
                                 hint="See `deploykit export --list`.")
    module = _build_fitting(lambda **kw: torchvision.models.get_model(arch, weights=None, **kw), state, arch,
                            path)
    module.eval()
    default = _weights_enum(arch).DEFAULT
    categories = list(default.meta.get("categories") or [])
    classes = _num_classes(state)
    return LoadedModel(
        module=module, name=name,
        source=Source(kind="checkpoint", arch=arch, weights="file", path=str(path.resolve()), sha256=digest,
                      num_classes=classes),
        labels=categories if classes == len(categories) else None,
        preprocess=_preprocess_from_weights(default),
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _import_factory(spec: str) -> Any:
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise UsageError(f"Factory {spec!r} must look like package.module:function or "
                         "path/to/file.py:function.")
    try:
        if module_part.endswith(".py"):
            file = Path(module_part)
            if not file.is_file():
                raise ModelNotFoundError(f"Factory file {module_part!r} does not exist.",
                                         hint="Check the path.")
            mod_name = f"deploykit_factory_{abs(hash(str(file.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, file)
            if loader_spec is None or loader_spec.loader is None:
                raise ModelNotFoundError(f"Cannot load {module_part!r} as a Python module.")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_part)
    except ImportError as exc:
        raise ModelNotFoundError(f"Cannot import {module_part!r} for factory {spec!r}: {exc}.",
                                 hint="Check the module path and that it is importable from here.") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ModelNotFoundError(f"{module_part!r} has no attribute {attr!r}.") from exc


def _from_factory(spec: str, *, weights: str | None, seed: int,
                  state: dict[str, Any] | None = None, state_path: Path | None = None) -> LoadedModel:
    torch = _torch()
    factory = _import_factory(spec)
    torch.manual_seed(seed)
    try:
        module = factory()
    except Exception as exc:  # the user's own code: any error type
        raise DeployKitError(f"Factory {spec!r} raised {one_line(exc, with_type=True)}.",
                             hint="Fix the factory; --debug shows where it failed.") from exc
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"Factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module.")
    # A file factory is recorded with its absolute path, so verify can rebuild it from any folder.
    module_part, _, attr = spec.rpartition(":")
    recorded = f"{Path(module_part).resolve()}:{attr}" if module_part.endswith(".py") else spec
    source = Source(kind="factory", name=recorded, seed=seed, weights="factory")
    choice = (weights or "DEFAULT").strip()
    if state is None and choice.upper() not in ("DEFAULT", "NONE", "FACTORY"):
        weights_path = state_path = Path(choice)
        state = _load_state_dict(weights_path)
        source = Source(kind="factory", name=recorded, seed=seed, weights="file",
                        path=str(weights_path.resolve()), sha256=sha256_file(weights_path))
    if state is not None:
        origin = f"The state dict {str(state_path)!r}" if state_path else "The state dict"
        _load_into(module, state, what=f"{origin} does not fit factory {spec!r}",
                   hint="Pass the factory that builds the architecture the checkpoint was trained with.")
    module.eval()
    name = str(getattr(module, "deploykit_meta", {}).get("name") or spec.rpartition(":")[2])
    return _apply_meta(LoadedModel(module=module, name=name, source=source), module)


def _apply_meta(loaded: LoadedModel, module: Any) -> LoadedModel:
    """Use labels/preprocessing a module declares in its ``deploykit_meta`` attribute."""
    meta = getattr(module, "deploykit_meta", None) or {}
    if meta.get("labels"):
        loaded.labels = [str(v) for v in meta["labels"]]
    if meta.get("preprocess"):
        try:
            loaded.preprocess = Preprocess.from_dict(meta["preprocess"], where="deploykit_meta.preprocess")
        except ModelFileError as exc:
            raise UsageError(f"deploykit_meta['preprocess'] of the model is invalid: {exc.message}") from exc
    if meta.get("output_kind"):
        loaded.output_kind = str(meta["output_kind"])
    return loaded


def first_layer_channels(module: Any) -> tuple[int, str] | None:
    """The input channels of the model's first 2-D convolution (a CNN's stem, a ViT's patch embedding) and the
    layer's name; None when the model has none (TorchScript's included, by its original class name)."""
    for name, layer in module.named_modules():
        if type(layer).__name__ == "Conv2d" or getattr(layer, "original_name", None) == "Conv2d":
            weight = getattr(layer, "weight", None)
            if weight is None or weight.dim() != 4:
                return None
            channels = int(weight.shape[1]) * int(getattr(layer, "groups", 1))
            return channels, f"{name or 'the model'!r} (Conv2d)"
    return None


def rebuild_source(source: Source) -> LoadedModel:
    """Rebuild the PyTorch model a card's ``source`` describes; checks a checkpoint's sha256.

    Raises:
        ModelNotFoundError: the file is gone. VerificationError: its digest changed.
    """
    from deploykit.errors import VerificationError

    from_file = source.kind in ("checkpoint", "torchscript", "pickle")
    if source.path and source.weights in ("file", None) or from_file:
        path = Path(source.path or "")
        if not path.is_file():
            raise ModelNotFoundError(
                f"The source recorded in the model card, {str(path)!r}, no longer exists.",
                hint="Pass --against with the model to compare with, or --fingerprint to check without it.",
            )
        if source.sha256 and sha256_file(path) != source.sha256:
            raise VerificationError(
                f"{str(path)!r} has changed since export: its sha256 no longer matches the model card.",
                hint="Export again from the current checkpoint, or pass --against explicitly.",
            )
    if source.kind == "torchvision":
        return _from_torchvision(source.name or "", weights=source.path if source.weights == "file"
                                 else source.weights, seed=source.seed or 0)
    if source.kind == "factory":
        try:
            return _from_factory(source.name or "",
                                 weights=source.path if source.weights == "file" else "DEFAULT",
                                 seed=source.seed or 0)
        except ModelNotFoundError as exc:  # "check the path" cannot help with a path recorded at export time
            raise ModelNotFoundError(f"The source recorded in the model card is gone: {exc.message}",
                                     hint="Pass --against with the model to compare with, or --fingerprint "
                                     "to check without it.") from exc
    if source.kind == "timm":
        return _from_timm(source.name or "", weights=source.path if source.weights == "file" else
                          "none" if source.weights == "none" else "DEFAULT", seed=source.seed or 0,
                          num_classes=source.num_classes)
    if source.kind == "hf":
        try:
            return _from_hf(source.path or f"{HF_PREFIX}{source.name}", weights=None,
                            num_classes=source.num_classes, seed=source.seed or 0)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"The source recorded in the model card is gone: {exc.message}",
                                     hint="Pass --against with the model to compare with, or --fingerprint "
                                     "to check without it.") from exc
    if source.kind == "checkpoint":
        return _from_file(Path(source.path or ""), arch=source.arch, trust_pickle=False,
                          seed=source.seed or 0)
    if source.kind in ("torchscript", "pickle"):
        return _from_file(Path(source.path or ""), arch=None, trust_pickle=source.kind == "pickle",
                          seed=source.seed or 0)
    raise UsageError(f"The model card's source kind {source.kind!r} cannot be rebuilt.",
                     hint="Pass --against with the model to compare with.")


# --- timm -------------------------------------------------------------------------------------------------
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"


def _timm() -> Any:
    _torch()
    require("timm", "timm")
    import timm

    return timm


def timm_models() -> list[str]:
    """Names of timm's models (``timm.list_models()``); ``timm:NAME`` exports one."""
    return list(_timm().list_models())


def _from_timm(name: str, *, weights: str | None, seed: int, num_classes: int | None) -> LoadedModel:
    """A timm model: random (``none``), timm's pretrained weights (``DEFAULT``, through its loader and the
    Hugging Face hub cache) or a state dict (``PATH``); ``num_classes`` replaces the head."""
    timm = _timm()
    torch = _torch()
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise ModelNotFoundError(
            f"Unknown timm model {name!r}.{suggest(base, timm.list_models())}",
            hint="See `deploykit export --list timm`.",
        )
    choice = (weights or "none").strip()
    head = {"num_classes": num_classes} if num_classes else {}
    torch.manual_seed(seed)
    if choice.lower() == "none":
        module = timm.create_model(name, pretrained=False, **head)
        source = Source(kind="timm", name=name, weights="none", seed=seed)
    elif choice.upper() == "DEFAULT":
        module = _timm_pretrained(timm, name, head)
        # The resolved tag (convnext_tiny -> convnext_tiny.in12k_ft_in1k), so verify loads the same weights
        # even after timm changes its default.
        tag = module.pretrained_cfg.get("tag")
        source = Source(kind="timm", name=f"{base}.{tag}" if tag else name, weights="DEFAULT", seed=seed)
    else:
        path = Path(choice)
        state = _load_state_dict(path)
        if not head:  # a fine-tuned checkpoint brings its own head: build the model with its class count
            classifier = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier")
            weight = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
            if weight is not None and weight.ndim == 2:
                head = {"num_classes": int(weight.shape[0])}
        module = timm.create_model(name, pretrained=False, **head)
        _load_into(module, state, what=f"The state dict {str(path)!r} does not fit timm model {name}",
                   hint="Pass the timm model the checkpoint was trained as (and --num-classes for its head).")
        source = Source(kind="timm", name=name, weights="file", path=str(path.resolve()),
                        sha256=sha256_file(path), seed=seed)
    module.eval()
    preprocess, problem = _timm_preprocess(timm, module)
    return LoadedModel(module=module, name=name.replace("/", "_"), source=source,
                       labels=_timm_labels(timm, module), preprocess=preprocess, geometry_problem=problem)


def _timm_pretrained(timm: Any, name: str, head: dict[str, Any]) -> Any:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return timm.create_model(name, pretrained=True, **head)
    except Exception as exc:  # hub misses (OSError), offline mode, httpx errors, bad files: all one message
        try:
            where = timm.models.get_pretrained_cfg(name).hf_hub_id or name
        except (RuntimeError, AttributeError, KeyError):  # no pretrained config for this name
            where = name
        raise WeightsUnavailableError(
            f"timm's pretrained weights for {name} are not in the Hugging Face cache and could not be "
            f"downloaded ({one_line(exc, with_type=True)}).",
            hint=f"Use --weights none or --weights PATH, or place {where} in the Hugging Face hub cache "
            "(HF_HUB_CACHE) on a machine with network access.",
        ) from exc


def _timm_labels(timm: Any, module: Any) -> list[str] | None:
    """ImageNet class names when timm recognises the head as an ImageNet subset."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(module)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != getattr(module, "num_classes", None):
        return None
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]


def _timm_preprocess(timm: Any, module: Any) -> tuple[Preprocess, UsageError | None]:
    """timm's eval transform from its data config, and why it cannot be reproduced (None when it can).

    ``center`` crops resize the shorter side to floor(size / crop_pct) and crop the centre (square inputs);
    ``squash`` with crop_pct 1 resizes straight to the input size (as ``Resize((h, w))``). Any other
    combination gets a straight resize in its place and the problem to raise unless the options choose.
    """
    import math

    from timm.data import DEFAULT_CROP_PCT, resolve_model_data_config

    config = resolve_model_data_config(module)
    channels, height, width = (int(v) for v in config["input_size"])
    crop_pct = float(config.get("crop_pct") or DEFAULT_CROP_PCT)
    mode = config.get("crop_mode") or "center"
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    interpolation = str(config.get("interpolation") or "bilinear")
    pp = Preprocess(
        height=height, width=width, resize=None,
        interpolation=interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bilinear",
        mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
        channels=channels, channel_order=default_channel_order(channels),
    )
    if mode == "squash" and scaled == (height, width):
        return pp, None
    if mode == "center" and height == width:
        return replace(pp, resize=max(height, scaled[0])), None
    return pp, UsageError(
        f"timm's data config for this model resizes with crop_mode {mode!r} and crop_pct {crop_pct:g} to a "
        f"{height}x{width} input, which none of deploykit's resize modes reproduces.",
        hint=GEOMETRY_HINT)


# --- Hugging Face Transformers ------------------------------------------------------------------------------
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _transformers() -> Any:
    _torch()
    require("transformers", "hf")
    import transformers

    return transformers


def is_hf_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder: a directory with a ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def _from_hf(spec: str, *, weights: str | None, num_classes: int | None, seed: int) -> LoadedModel:
    """A Transformers image classifier: a ``save_pretrained`` folder, or ``hf:ORG/NAME`` from the local cache.

    Labels come from ``config.id2label``, preprocessing from the image processor's config; the ONNX output
    is the logits. ``num_classes`` other than the model's replaces its head (initialised from ``seed``).
    """
    transformers = _transformers()
    torch = _torch()
    local = not spec.startswith(HF_PREFIX)
    where = str(Path(spec).resolve()) if local else spec[len(HF_PREFIX):]
    if weights and weights.strip().upper() not in ("DEFAULT", "FILE"):
        raise UsageError(f"--weights {weights} does not apply to a Hugging Face model; its weights come with "
                         "it.", hint="Save the fine-tuned model with save_pretrained and export that folder.")
    torch.manual_seed(seed)
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on stderr
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            processor = transformers.AutoImageProcessor.from_pretrained(where, local_files_only=True)
            module = transformers.AutoModelForImageClassification.from_pretrained(
                where, local_files_only=True, **({"num_labels": num_classes, "ignore_mismatched_sizes": True}
                                                 if num_classes else {}))
    except (OSError, ValueError, KeyError) as exc:  # not cached / no such folder / not an image classifier
        missing = isinstance(exc, OSError) and not local
        raise (ModelNotFoundError if missing else UsageError)(
            f"Cannot load {spec!r} as a Hugging Face image classifier"
            + (" from the local Hugging Face cache" if not local else "") + f": {one_line(exc)}.",
            hint="Download it with network access first (huggingface-cli download ORG/NAME), or export a "
            "save_pretrained folder that has config.json, the weights and preprocessor_config.json."
            if missing else "The folder needs config.json, the weights and preprocessor_config.json of an "
            "image classification model.",
        ) from exc
    finally:
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    module.eval()
    id2label = dict(getattr(module.config, "id2label", None) or {})
    labels = [str(id2label[i]) for i in range(len(id2label))] if sorted(id2label) == list(
        range(len(id2label))) else None
    name = Path(where).name if local else where.replace("/", "_")
    source = Source(kind="hf", name=None if local else where, path=where if local else None,
                    weights="DEFAULT", seed=seed)
    preprocess, problem = _hf_preprocess(processor, spec)
    return LoadedModel(module=module, name=name, source=source, labels=labels, preprocess=preprocess,
                       geometry_problem=problem)


def _hf_preprocess(processor: Any, spec: str) -> tuple[Preprocess, UsageError | None]:
    """The image processor's resize/crop/rescale/normalise as a Preprocess, and why its geometry cannot be
    reproduced (None when it can; the Preprocess then resizes straight to the crop in its place).

    ``size`` is ``{"height", "width"}`` (resize straight to it: ViT, Swin), or ``{"shortest_edge"}`` with
    either ``crop_pct`` (ConvNeXt: resize the shorter side to shortest_edge / crop_pct, crop shortest_edge;
    from 384 on it resizes straight to shortest_edge) or ``crop_size`` (resize, then centre crop).
    """
    size = dict(getattr(processor, "size", None) or {})
    crop_size = dict(getattr(processor, "crop_size", None) or {})
    do_crop = bool(getattr(processor, "do_center_crop", False))
    resample = getattr(processor, "resample", 2)
    interpolation = _PIL_RESAMPLE.get(int(resample), "bilinear") if resample is not None else "bilinear"
    height: int
    width: int
    resize: int | None
    problem = None
    if "height" in size and "width" in size:
        height, width, resize = int(size["height"]), int(size["width"]), None
        crop_height = int(crop_size.get("height") or 0)
        crop = (crop_height, int(crop_size.get("width") or crop_height))
        if do_crop and crop[0] and crop != (height, width):
            # BEiT-style: Resize((h, w)) ignores the aspect ratio, then CenterCrop
            problem = UsageError(
                f"{spec!r} resizes images to {height}x{width}, ignoring their aspect ratio, and then crops "
                f"{crop[0]}x{crop[1]}, which none of deploykit's resize modes reproduces.",
                hint=GEOMETRY_HINT)
            height, width = crop
    elif "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        crop_pct = getattr(processor, "crop_pct", None)
        if crop_pct is not None and not do_crop:
            height = width = edge
            resize = int(edge / float(crop_pct)) if edge < 384 else None
        elif do_crop and crop_size.get("height"):
            height, resize = int(crop_size["height"]), edge
            width = int(crop_size.get("width") or height)
        else:
            height = width = resize = edge
    else:
        raise UsageError(f"The image processor of {spec!r} has a size deploykit does not understand: {size}.")
    normalize = bool(getattr(processor, "do_normalize", True))
    mean = tuple(float(v) for v in processor.image_mean) if normalize else (0.0, 0.0, 0.0)
    std = tuple(float(v) for v in processor.image_std) if normalize else (1.0, 1.0, 1.0)
    scale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) \
        else 1.0
    return Preprocess(height=height, width=width, resize=resize, interpolation=interpolation, mean=mean,
                      std=std, scale=scale), problem
