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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.card import Preprocess, Source
from deploykit.errors import (
    DeployKitError,
    MissingExtraError,
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


@dataclass
class LoadedModel:
    """A PyTorch module in eval mode and what the model card records about it."""

    module: torch.nn.Module
    name: str
    source: Source
    labels: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    output_kind: str = "logits"


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
                   trust_pickle: bool = False, seed: int = DEFAULT_SEED) -> LoadedModel:
    """Resolve a MODEL spec to a module.

    Args:
        spec: a torchvision model name, a checkpoint or TorchScript file, or a factory ``pkg.mod:fn`` /
            ``path/file.py:fn``.
        arch: the architecture (torchvision name or factory) for a state-dict checkpoint.
        weights: for torchvision names: ``DEFAULT``, an enum name, ``none`` or a state-dict path.
        trust_pickle: allow unpickling a full model object (runs code from the file).
        seed: the seed for random initialisation when ``weights`` is ``none``.

    Raises:
        ModelNotFoundError, UsageError, WeightsUnavailableError, MissingExtraError.
    """
    torch = _torch()
    path = Path(spec)
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
        crop=crop,
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
                                name)
        source = Source(kind="torchvision", name=name, weights="file", path=str(Path(choice).resolve()),
                        sha256=sha256_file(choice))
        meta_weights = default
    else:
        meta_weights = _pick_weights(enum, choice, name)
        state = _fetch_weights(meta_weights, name)
        module = torchvision.models.get_model(name, weights=None, **_weights_kwargs(name, meta_weights))
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsUnavailableError(
                f"The cached weights for {name}.{meta_weights.name} do not fit the model: "
                f"{_mismatch(module, state)}.",
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
            return dict(weights.get_state_dict(progress=False, check_hash=True))
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
            return dict(weights.get_state_dict(progress=False, check_hash=True))
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
    torch = _torch()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return {k.removeprefix("module."): v for k, v in tensors.items()}
    raise UsageError(f"{str(path)!r} holds no state dict (a mapping of parameter names to tensors).")


def _mismatch(module: Any, state: dict[str, Any], limit: int = 3) -> str:
    """Why ``state`` does not load into ``module``: missing/unexpected keys and shape differences, briefly."""
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
    return "; ".join(parts) or "the keys and shapes match, but loading failed"


def _num_classes(state: dict[str, Any]) -> int | None:
    """Classes of the final linear layer: the last 2-D weight that is not an auxiliary head."""
    candidates = [k for k, v in state.items()
                  if k.endswith("weight") and v.ndim == 2 and "aux" not in k.lower()]
    return int(state[candidates[-1]].shape[0]) if candidates else None


def _build_fitting(build: Any, state: dict[str, Any], arch: str) -> torch.nn.Module:
    """Build ``arch`` with the class count the state dict implies and load it strictly."""
    num_classes = _num_classes(state)
    kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes else {}
    if arch.startswith(("inception", "googlenet")):
        kwargs.update(aux_logits=any("aux" in k.lower() for k in state), init_weights=False)
    try:
        module = build(**kwargs)
    except TypeError:
        module = build()
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(
            f"The state dict does not fit --arch {arch}: {_mismatch(module, state)}.",
            hint="Pass the architecture the checkpoint was trained with.",
        ) from exc
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
        base = _from_factory(arch, weights="none", seed=seed, state=state)
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
    module = _build_fitting(lambda **kw: torchvision.models.get_model(arch, weights=None, **kw), state, arch)
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
                  state: dict[str, Any] | None = None) -> LoadedModel:
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
        weights_path = Path(choice)
        state = _load_state_dict(weights_path)
        source = Source(kind="factory", name=recorded, seed=seed, weights="file",
                        path=str(weights_path.resolve()), sha256=sha256_file(weights_path))
    if state is not None:
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageError(f"The state dict does not fit factory {spec!r}: {_mismatch(module, state)}.",
                             hint="Pass the factory that builds the architecture the checkpoint was "
                             "trained with.",
                             ) from exc
    module.eval()
    name = str(getattr(module, "deploykit_meta", {}).get("name") or spec.rpartition(":")[2])
    return _apply_meta(LoadedModel(module=module, name=name, source=source), module)


def _apply_meta(loaded: LoadedModel, module: Any) -> LoadedModel:
    """Use labels/preprocessing a module declares in its ``deploykit_meta`` attribute."""
    meta = getattr(module, "deploykit_meta", None) or {}
    if meta.get("labels"):
        loaded.labels = [str(v) for v in meta["labels"]]
    if meta.get("preprocess"):
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in meta["preprocess"].items()}
        try:
            loaded.preprocess = Preprocess(**fields)
        except TypeError as exc:
            raise UsageError(f"deploykit_meta['preprocess'] of the model is invalid: {exc}.") from exc
    if meta.get("output_kind"):
        loaded.output_kind = str(meta["output_kind"])
    return loaded


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
    if source.kind == "checkpoint":
        return _from_file(Path(source.path or ""), arch=source.arch, trust_pickle=False,
                          seed=source.seed or 0)
    if source.kind in ("torchscript", "pickle"):
        return _from_file(Path(source.path or ""), arch=None, trust_pickle=source.kind == "pickle",
                          seed=source.seed or 0)
    raise UsageError(f"The model card's source kind {source.kind!r} cannot be rebuilt.",
                     hint="Pass --against with the model to compare with.")
