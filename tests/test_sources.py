"""Every MODEL form export accepts (checkpoints, TorchScript, pickles, factories) and every --weights choice.

The exports are real and checked with ONNX Runtime against the PyTorch module they came from.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from conftest import EXAMPLES, SHAPES_FACTORY, run_cli

from deploykit.card import Source, read_card
from deploykit.errors import DeployKitError, ExitCode, ModelNotFoundError, UsageError, WeightsUnavailableError
from deploykit.export import export_model
from deploykit.files import sha256_file
from deploykit.runtime import create_session
from deploykit.sources import rebuild_source, resolve_source

TINY_SOURCE = textwrap.dedent('''
    """A tiny classifier used as a user's own model in the tests."""
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self, num_classes: int = 4) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


    def build() -> nn.Module:
        torch.manual_seed(123)
        model = Tiny()
        model.deploykit_meta = {
            "name": "tiny",
            "labels": ["ant", "bee", "cat", "dog"],
            "preprocess": {"crop": 32, "resize": 40, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
        }
        return model


    def build_plain() -> nn.Module:
        torch.manual_seed(7)
        return Tiny()


    def not_a_model() -> str:
        return "hello"


    def explodes() -> nn.Module:
        raise RuntimeError("factory exploded")
''')


@pytest.fixture
def tiny_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package `<unique>.models` in tmp_path, the working folder (as a user's project would be)."""
    name = f"userpkg_{abs(hash(str(tmp_path)))}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(TINY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the folder resolve_source adds to sys.path
    return f"{name}.models"


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_model.py"
    path.write_text(TINY_SOURCE)
    return path


def tiny_module(tiny_file: Path, factory: str = "build") -> torch.nn.Module:
    """The same model the factory builds, made independently of deploykit (for reference outputs)."""
    namespace: dict[str, Any] = {"__name__": "tiny_reference"}
    exec(compile(tiny_file.read_text(), str(tiny_file), "exec"), namespace)  # noqa: S102 - our own test source
    return namespace[factory]().eval()


def ort_vs_torch(onnx_path: Path, module: torch.nn.Module, batch: int = 5) -> float:
    """Max abs difference between ONNX Runtime and ``module`` on a seeded batch of the card's input shape."""
    card = read_card(onnx_path)
    shape = [batch if isinstance(d, str) else d for d in card.input.shape]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    session = create_session(onnx_path)
    actual = session.run(None, {card.input.name: x})[0]
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max())


# --- checkpoint forms ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_10_classes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A 10-class resnet18 state dict (as a fine-tuning run would save it) and the module it came from."""
    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("ckpt") / "finetuned.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_state_dict_with_torchvision_arch(
    resnet18_10_classes: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, model = resnet18_10_classes
    result = export_model(str(path), arch="resnet18", output=tmp_path / "ft.onnx", input_size=64)
    card = read_card(result.path)
    assert card.num_classes == 10  # inferred from fc.weight, not torchvision's 1000
    assert card.labels == tuple(f"class_{i}" for i in range(10))
    assert card.source.kind == "checkpoint"
    assert card.source.arch == "resnet18"
    assert card.source.sha256 == sha256_file(path)
    assert (card.preprocess.height, card.preprocess.width) == (64, 64)
    assert card.input.shape == ("batch", 3, 64, 64)
    assert ort_vs_torch(result.path, model) < 1e-4


@pytest.mark.parametrize("wrap", ["state_dict", "model_state_dict", "module_prefix"])
def test_wrapped_state_dicts(
    wrap: str, resnet18_10_classes: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    _, model = resnet18_10_classes
    state = model.state_dict()
    obj: Any
    if wrap == "module_prefix":  # saved from nn.DataParallel
        obj = {f"module.{k}": v for k, v in state.items()}
    else:
        obj = {wrap: state, "epoch": 12, "optimizer": {"lr": 0.1}}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    loaded = resolve_source(str(path), arch="resnet18")
    assert loaded.source.num_classes == 10
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_state_dict_needs_arch(resnet18_10_classes: tuple[Path, torch.nn.Module]) -> None:
    path, _ = resnet18_10_classes
    with pytest.raises(UsageError, match="--arch") as info:
        resolve_source(str(path))
    assert info.value.exit_code == ExitCode.USAGE


def test_state_dict_that_does_not_fit_arch(resnet18_10_classes: tuple[Path, torch.nn.Module]) -> None:
    path, _ = resnet18_10_classes
    with pytest.raises(UsageError) as info:
        resolve_source(str(path), arch="resnet34")
    message = str(info.value)
    assert "does not fit --arch resnet34" in message
    assert "missing key(s)" in message
    assert "layer1.2.conv1.weight" in message
    assert len(message) < 500, "the mismatch must be summarised, not every key listed"
    assert info.value.exit_code == ExitCode.USAGE
    with pytest.raises(UsageError, match="shape mismatch"):
        resolve_source(str(path), arch="resnet50")


def test_unknown_arch_suggests(resnet18_10_classes: tuple[Path, torch.nn.Module]) -> None:
    path, _ = resnet18_10_classes
    with pytest.raises(ModelNotFoundError, match="Did you mean resnet18"):
        resolve_source(str(path), arch="resnet81")


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file(how: str, tiny_file: Path, tmp_path: Path) -> None:
    module = tiny_module(tiny_file)
    example = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, example)
    path = tmp_path / f"tiny_{how}.pt"
    scripted.save(str(path))
    result = export_model(str(path), output=tmp_path / "ts.onnx", input_size=32)
    card = read_card(result.path)
    assert card.source.kind == "torchscript"
    assert card.source.sha256 == sha256_file(path)
    assert card.exporter == "torchscript"
    assert card.name == f"tiny_{how}"
    assert card.dynamic_batch
    assert ort_vs_torch(result.path, module, batch=7) < 1e-4


def test_pickled_model_needs_trust(tiny_package: str, tmp_path: Path) -> None:
    import importlib

    sys.path.insert(0, str(tmp_path))
    module = importlib.import_module(tiny_package).build().eval()
    path = tmp_path / "full_model.pt"
    torch.save(module, path)
    with pytest.raises(UsageError) as info:
        resolve_source(str(path))
    message = str(info.value)
    assert "Unpickling runs code" in message
    assert "--trust-pickle" in message
    result = export_model(str(path), trust_pickle=True, output=tmp_path / "pickled.onnx")
    card = read_card(result.path)
    assert card.source.kind == "pickle"
    assert card.labels == ("ant", "bee", "cat", "dog")  # deploykit_meta travels with the pickled object
    assert ort_vs_torch(result.path, module) < 1e-4


def test_pickled_model_whose_class_is_gone(
    tiny_package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    sys.path.insert(0, str(tmp_path))
    module = importlib.import_module(tiny_package).build()
    path = tmp_path / "orphan.pt"
    torch.save(module, path)
    sys.modules.pop(tiny_package)
    sys.modules.pop(tiny_package.split(".")[0])
    sys.path.remove(str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)  # the package is not importable from here
    with pytest.raises(UsageError, match="cannot be unpickled"):
        resolve_source(str(path), trust_pickle=True)


def test_factory_package_module_function(tiny_package: str, tiny_file: Path, tmp_path: Path) -> None:
    result = export_model(f"{tiny_package}:build", output=tmp_path / "factory.onnx")
    card = read_card(result.path)
    assert card.name == "tiny"
    assert card.labels == ("ant", "bee", "cat", "dog")
    assert (card.preprocess.height, card.preprocess.width, card.preprocess.resize) == (32, 32, 40)
    assert card.preprocess.mean == (0.5, 0.4, 0.3)
    assert card.source.kind == "factory"
    assert ort_vs_torch(result.path, tiny_module(tiny_file)) < 1e-4


def test_factory_file_path(tiny_file: Path, tmp_path: Path) -> None:
    result = export_model(f"{tiny_file}:build_plain", output=tmp_path / "plain.onnx", input_size=48)
    card = read_card(result.path)
    assert card.name == "build_plain"
    assert card.labels == ("class_0", "class_1", "class_2", "class_3")
    assert card.input.shape == ("batch", 3, 48, 48)
    assert ort_vs_torch(result.path, tiny_module(tiny_file, "build_plain")) < 1e-4


def test_state_dict_with_factory_arch(tiny_file: Path, tmp_path: Path) -> None:
    trained = tiny_module(tiny_file, "build_plain")
    with torch.no_grad():
        trained.fc.bias.fill_(0.75)  # differs from what the factory builds
    path = tmp_path / "tiny_state.pt"
    torch.save(trained.state_dict(), path)
    loaded = resolve_source(str(path), arch=f"{tiny_file}:build_plain")
    assert loaded.source.kind == "checkpoint"
    assert torch.equal(loaded.module.fc.bias, trained.fc.bias)


def test_factory_errors(tiny_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="has no attribute 'nope'"):
        resolve_source(f"{tiny_file}:nope")
    with pytest.raises(UsageError, match="not a torch.nn.Module"):
        resolve_source(f"{tiny_file}:not_a_model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(f"{tmp_path / 'missing.py'}:build")
    with pytest.raises(ModelNotFoundError, match="Cannot import"):
        resolve_source("no_such_package_xyz.models:build")


def test_factory_that_raises_is_one_line_without_traceback(tiny_file: Path, tmp_path: Path) -> None:
    with pytest.raises(DeployKitError, match=r"Factory '.*:explodes' raised RuntimeError: factory exploded"):
        resolve_source(f"{tiny_file}:explodes")
    result = run_cli("export", f"{tiny_file}:explodes", "-o", str(tmp_path / "x.onnx"))
    assert result.returncode == ExitCode.ERROR
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"Error: Factory '{tiny_file}:explodes' raised RuntimeError: factory exploded. Fix the factory; "
        "--debug shows where it failed."]


def test_rebuilding_a_factory_that_is_gone_names_the_way_out(tmp_path: Path) -> None:
    gone = Source(kind="factory", name=f"{tmp_path / 'gone' / 'model.py'}:build", seed=0, weights="factory")
    with pytest.raises(ModelNotFoundError) as info:
        rebuild_source(gone)
    assert "The source recorded in the model card is gone" in str(info.value)
    assert "--against" in str(info.value)
    assert "--fingerprint" in str(info.value)


def test_bundled_example_factory(shapes_onnx: Path) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from data import CLASSES  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))
    card = read_card(shapes_onnx)
    assert card.name == "shapes"
    assert card.labels == tuple(CLASSES)
    pp = card.preprocess
    assert (pp.resize, pp.height, pp.width, pp.interpolation) == (72, 64, 64, "bilinear")
    assert pp.mean == (0.5, 0.5, 0.5)
    assert pp.std == (0.25, 0.25, 0.25)
    assert card.source.kind == "factory"
    assert card.source.name == SHAPES_FACTORY
    assert card.parity is not None
    assert card.parity["passed"]


# --- checkpoint damage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "text", "empty"])
def test_corrupt_checkpoints(
    damage: str, resnet18_10_classes: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    good = resnet18_10_classes[0].read_bytes()
    data = {
        "truncated": good[: len(good) // 2],
        "garbage": np.random.default_rng(1).bytes(4096),
        "text": b"this is a text file, not a checkpoint\n",
        "empty": b"",
    }[damage]
    path = tmp_path / f"{damage}.pt"
    path.write_bytes(data)
    for kwargs in ({"arch": "resnet18"}, {"arch": "resnet18", "trust_pickle": True}):
        with pytest.raises(UsageError) as info:
            resolve_source(str(path), **kwargs)
        message = str(info.value)
        assert "not a readable checkpoint" in message
        assert "truncated or corrupt" in message
        assert "--trust-pickle" not in message, "damaged files must not be mistaken for pickled models"
        assert info.value.exit_code == ExitCode.USAGE


def test_missing_checkpoint() -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source("no/such/model.pt")


# --- --weights ----------------------------------------------------------------------------------------------


def test_weights_none_is_reproducible_from_the_seed() -> None:
    first = resolve_source("mobilenet_v3_small", weights="none", seed=3)
    again = resolve_source("mobilenet_v3_small", weights="none", seed=3)
    other = resolve_source("mobilenet_v3_small", weights="none", seed=4)
    assert first.source.weights == "none"
    assert first.source.seed == 3
    a, b, c = (m.module.state_dict() for m in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    rebuilt = rebuild_source(first.source).module.state_dict()
    assert all(torch.equal(a[k], rebuilt[k]) for k in a)


def test_weights_from_a_state_dict_path(
    resnet18_10_classes: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, model = resnet18_10_classes
    loaded = resolve_source("resnet18", weights=str(path))
    assert loaded.source.weights == "file"
    assert loaded.source.sha256 == sha256_file(path)
    assert loaded.labels is None, "ImageNet labels do not apply to a 10-class fine-tune"
    assert torch.equal(loaded.module.fc.weight, model.fc.weight)
    torch.manual_seed(0)
    imagenet_shaped = tmp_path / "in1k.pt"
    torch.save(torchvision.models.resnet18().state_dict(), imagenet_shaped)
    loaded = resolve_source("resnet18", weights=str(imagenet_shaped))
    assert loaded.labels is not None
    assert len(loaded.labels) == 1000
    assert loaded.labels[0] == "tench"


def test_unknown_weights_name_lists_the_choices() -> None:
    with pytest.raises(UsageError, match="available: IMAGENET1K_V1") as info:
        resolve_source("resnet18", weights="IMAGENET1K_V9")
    assert info.value.exit_code == ExitCode.USAGE


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_source("resnet81")
    message = str(info.value)
    assert "Unknown model 'resnet81'" in message
    assert "Did you mean resnet18" in message
    assert "deploykit export --list" in message
    assert info.value.exit_code == ExitCode.USAGE


RESNET18_CACHE_NAME = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A TORCH_HOME whose hub cache holds "pretrained" resnet18 weights (seeded random, saved by us)."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(42)
    model = torchvision.models.resnet18().eval()
    torch.save(model.state_dict(), checkpoints / RESNET18_CACHE_NAME)
    return home, model


def test_weights_enum_name_from_the_hub_cache(
    torch_home: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, model = torch_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    for choice in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT", "default"):
        loaded = resolve_source("resnet18", weights=choice)
        assert loaded.source.weights == "IMAGENET1K_V1"
        assert loaded.labels is not None
        assert len(loaded.labels) == 1000
        assert torch.equal(loaded.module.fc.weight, model.fc.weight), choice
        assert torch.equal(loaded.module.bn1.running_var, model.bn1.running_var), choice


def test_weights_default_offline_through_the_cli(
    torch_home: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """The real path a user takes offline: weights earlier downloaded into the hub cache."""
    home, model = torch_home
    target = tmp_path / "pretrained.onnx"
    proc = run_cli("export", "resnet18", "-o", str(target), "--json", env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    card = read_card(target)
    assert card.source.weights == "IMAGENET1K_V1"
    assert card.labels[0] == "tench"
    assert ort_vs_torch(target, model) < 1e-4
    assert sorted(p.name for p in (home / "hub" / "checkpoints").iterdir()) == [RESNET18_CACHE_NAME]


def test_corrupt_cached_weights_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / RESNET18_CACHE_NAME).write_bytes(b"PK\x03\x04 half a download")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_source("resnet18", weights="DEFAULT")
    message = str(info.value)
    assert str(checkpoints / RESNET18_CACHE_NAME) in message
    assert "Delete it" in message


def test_cached_weights_for_another_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.resnet34().state_dict(), checkpoints / RESNET18_CACHE_NAME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="do not fit the model"):
        resolve_source("resnet18", weights="DEFAULT")


def test_weights_unavailable_offline(tmp_path: Path, refused_downloads: dict[str, str]) -> None:
    """Nothing cached and the download refused (as offline, whether or not this machine has a network):
    exit 1, one line naming every remedy, nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "empty_torch_home"
    proc = run_cli(
        "export", "resnet18", "--weights", "DEFAULT", env={"TORCH_HOME": str(home), **refused_downloads},
        cwd=work, timeout=120,
    )
    assert proc.returncode == ExitCode.ERROR, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    message = lines[0]
    assert "resnet18.IMAGENET1K_V1 are not cached and could not be downloaded" in message
    assert "--weights none" in message
    assert "--weights PATH" in message
    assert str(home / "hub" / "checkpoints") in message
    assert "TORCH_HOME" in message
    assert proc.stdout == ""
    assert list(work.iterdir()) == []
    checkpoints = home / "hub" / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == [], "no partial download left behind"
