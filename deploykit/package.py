"""``package_model``: an exported ONNX file -> a Triton or KServe model repository, a Docker build context, or
Kubernetes manifests.

Everything comes from the model card inside the file (input/output names, shapes, dtypes, labels), so the
packaged model answers with the same tensors and labels as ``deploykit serve``. The output folder is built
beside its final place and renamed into it at the end, so an error or Ctrl-C never leaves a half-written
repository. YAML and Dockerfiles are rendered from ``deploykit/templates/`` with :class:`string.Template`
(no YAML library is needed at run time). This module never imports torch or onnxruntime.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from importlib import metadata, resources
from pathlib import Path
from string import Template
from typing import Any

from deploykit import __version__
from deploykit.card import ModelCard, TensorSpec, card_from_metadata, load_onnx
from deploykit.datatypes import V2_BY_NUMPY, triton_type
from deploykit.errors import ModelFileError, UsageError
from deploykit.serve.config import DEFAULT_DECODE_BUDGET_MB, MAX_BATCH_ONE_AT_A_TIME, ServeConfig

FORMATS = ("triton", "kserve", "docker", "k8s")
CONTAINER_PORT = 8080
STORAGE_URI_PLACEHOLDER = "s3://YOUR-BUCKET/PATH/TO/THIS/FOLDER"
_DEFAULTS = {f.name: f.default for f in fields(ServeConfig)}
# Triton batches on one instance group the way deploykit serve does with one call at a time.
DEFAULT_MAX_BATCH_SIZE: int = MAX_BATCH_ONE_AT_A_TIME
DEFAULT_GRACEFUL_TIMEOUT: float = _DEFAULTS["graceful_timeout"]  # type: ignore[assignment]
_SERVE_THREADS: int = _DEFAULTS["threads"]  # type: ignore[assignment]
_SERVE_MAX_BODY_MB: float = _DEFAULTS["max_body_mb"]  # type: ignore[assignment]

# Same rule as `deploykit serve name=path`, so a packaged name is also a valid deploykit model name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Values substituted into YAML must not be able to break out of their scalar.
_URI = re.compile(r"^[^\s\"'\\]+$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_NEXT_STEP = {
    "triton": "Serve it: tritonserver --model-repository {out}\n"
              "      or: deploykit serve {name}={out}/{name}/1/model.onnx",
    "kserve": "Upload {out} to storage, set storageUri in {out}/inferenceservice.yaml, then: "
              "kubectl apply -f {out}/inferenceservice.yaml",
    "docker": "Build and run it: docker build -t {image} {out} && docker run --rm -p {port}:{port} {image}",
    "k8s": "Push {image} to a registry the cluster can pull from, then: kubectl apply -f {out}",
}


@dataclass(frozen=True)
class PackageResult:
    """What ``package_model`` wrote: the format, the folder and every file in it (relative paths)."""

    format: str
    output_dir: Path
    name: str
    files: tuple[str, ...]
    dynamic_batch: bool
    max_batch_size: int
    image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "output_dir": str(self.output_dir),
            "name": self.name,
            "files": list(self.files),
            "dynamic_batch": self.dynamic_batch,
            "max_batch_size": self.max_batch_size,
            "image": self.image,
            "next_step": self.next_step,
        }

    @property
    def next_step(self) -> str:
        return _NEXT_STEP[self.format].format(out=self.output_dir, name=self.name, image=self.image,
                                              port=CONTAINER_PORT)

    def __str__(self) -> str:
        kind = {"triton": "Triton model repository", "kserve": "KServe InferenceService with its Triton "
                "model repository", "docker": "Docker build context", "k8s": "set of Kubernetes manifests"}
        lines = [f"Wrote a {kind[self.format]} for model '{self.name}' to {self.output_dir}:"]
        source = [f for f in self.files if f.startswith("deploykit/")]
        lines += [f"  {f}" for f in self.files if f not in source]
        if source:
            lines.append(f"  deploykit/  ({len(source)} files: the deploykit source the image installs)")
        lines.append(self.next_step)
        return "\n".join(lines)


def package_model(
    onnx_path: str | Path,
    *,
    format: str,
    output_dir: str | Path,
    name: str | None = None,
    max_batch_size: int | None = None,
    instance_count: int = 1,
    max_queue_delay_us: int = 0,
    image: str | None = None,
    storage_uri: str = STORAGE_URI_PLACEHOLDER,
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
    prestop_seconds: int = 5,
    cpu_request: str = "500m",
    cpu_limit: str = "2",
    memory: str | None = None,
    min_replicas: int = 1,
    max_replicas: int = 4,
    target_cpu_percent: int = 70,
    force: bool = False,
) -> PackageResult:
    """Package an exported ONNX file for another serving stack.

    Args:
        onnx_path: an ONNX file written by ``deploykit export`` (it must carry a model card).
        format: ``triton`` (model repository), ``kserve`` (repository + InferenceService), ``docker`` (build
            context of a deploykit server image holding the model) or ``k8s`` (Deployment, Service, HPA).
        output_dir: folder to create; an existing non-empty folder is replaced only with ``force``.
        name: model name (Triton model, V2 model name, Kubernetes resources) [default: the card's name].
        max_batch_size: Triton's batch limit for a dynamic-batch model [default: 8, deploykit serve's with one
            call at a time].
        instance_count: Triton CPU instances of the model.
        max_queue_delay_us: Triton dynamic batching delay; 0 batches only what is already queued.
        image: container image name for ``docker``/``k8s`` [default: deploykit-<name>:<version>].
        storage_uri: the KServe ``storageUri`` (where the repository is uploaded).
        graceful_timeout, prestop_seconds: the server's drain time on SIGTERM and the preStop delay before it;
            the pod's terminationGracePeriodSeconds is set above their sum.
        cpu_request, cpu_limit, memory, min_replicas, max_replicas, target_cpu_percent: pod settings.
            ``memory`` (the request and the limit) defaults to the server's peak for this model, from
            :func:`serve_memory_mb`, with a quarter of headroom.
        force: replace a non-empty ``output_dir``.

    Raises:
        UsageError: bad options, or an output folder that cannot be replaced.
        ModelFileError: the file has no model card, or the card does not match the graph.
    """
    if format not in FORMATS:
        raise UsageError(f"Unknown package format {format!r}; choose one of {', '.join(FORMATS)}.")
    onnx_path = Path(onnx_path)
    card = _read_checked_card(onnx_path)
    name = name if name is not None else card.name
    if not _NAME.fullmatch(name):
        raise UsageError(f"Invalid model name {name!r}: use letters, digits, '_', '-' and '.', starting "
                         "with a letter or digit.", hint="Pass another one with --name.")
    batch = _batch_size(card, max_batch_size)
    checks = [
        (instance_count < 1, f"--instances must be at least 1, got {instance_count}"),
        (max_queue_delay_us < 0, f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}"),
        (graceful_timeout < 0, f"graceful_timeout must be >= 0, got {graceful_timeout}"),
        (prestop_seconds < 0, f"prestop_seconds must be >= 0, got {prestop_seconds}"),
        (not 1 <= min_replicas <= max_replicas,
         f"need 1 <= min_replicas <= max_replicas, got {min_replicas} and {max_replicas}"),
        (not 1 <= target_cpu_percent <= 100, f"target_cpu_percent must be 1..100, got {target_cpu_percent}"),
        (not _URI.fullmatch(storage_uri),
         f"--storage-uri must be a URI without spaces or quotes, got {storage_uri!r}"),
        (image is not None and not _IMAGE.fullmatch(image),
         f"--image is not a valid image reference: {image!r}"),
        (not all(_QUANTITY.fullmatch(q) for q in (cpu_request, cpu_limit, memory or "0")),
         f"cpu and memory must be Kubernetes quantities such as 500m, 2, 1Gi; got {cpu_request!r}, "
         f"{cpu_limit!r}, {memory!r}"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message + ".")
    if memory is None:
        # Triton decodes no images (clients send tensors): no decode budget there
        budget = 0.0 if format == "kserve" else DEFAULT_DECODE_BUDGET_MB
        memory = memory_quantity(serve_memory_mb(onnx_path.stat().st_size, decode_budget_mb=budget))
    k8s = k8s_name(name)
    if image is None and format in ("docker", "k8s"):
        image = f"deploykit-{k8s}:{__version__}"
    values = {
        "name": name, "k8s_name": k8s, "image": image or "", "port": CONTAINER_PORT,
        "graceful_timeout": f"{graceful_timeout:g}", "prestop_seconds": prestop_seconds,
        # Kubernetes counts the preStop hook inside the grace period; 10 s of margin before SIGKILL.
        "termination_grace": int(prestop_seconds + graceful_timeout + 0.999) + 10,
        "cpu_request": cpu_request, "cpu_limit": cpu_limit, "memory": memory,
        "min_replicas": min_replicas, "max_replicas": max_replicas, "target_cpu_percent": target_cpu_percent,
        "storage_uri": storage_uri,
    }
    output = Path(output_dir)
    with _staging_dir(output, force=force, source=onnx_path) as stage:
        if format in ("triton", "kserve"):
            _write_triton_repo(stage, onnx_path, card, name, batch, instance_count, max_queue_delay_us)
            if format == "kserve":
                _render(stage / "inferenceservice.yaml", "inferenceservice.yaml", values)
        elif format == "docker":
            _write_docker_context(stage, onnx_path, name, values)
        else:
            for manifest in ("deployment.yaml", "service.yaml", "hpa.yaml"):
                _render(stage / manifest, manifest, values)
        files = tuple(sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()))
    return PackageResult(format=format, output_dir=output, name=name, files=files,
                         dynamic_batch=card.dynamic_batch, max_batch_size=batch,
                         image=image if format in ("docker", "k8s") else None)


#: deploykit serve's resident memory with no model loaded, and per MB of ONNX file (two sessions on a
#: machine of several cores, and ONNX Runtime's arenas), measured with the example model and resnet18.
SERVE_BASE_MB = 110
SERVE_MB_PER_MODEL_MB = 2.5


def serve_memory_mb(
    model_bytes: int,
    *,
    decode_budget_mb: float = DEFAULT_DECODE_BUDGET_MB,
    threads: int = _SERVE_THREADS,
    max_body_mb: float = _SERVE_MAX_BODY_MB,
) -> float:
    """The peak resident memory of ``deploykit serve`` for a model of ``model_bytes`` (docs/serving.md):
    the process and its sessions, the decode budget, and each handler thread's request body (twice: the body
    and a copy while it is read)."""
    model_mb = model_bytes / (1024 * 1024)
    return SERVE_BASE_MB + SERVE_MB_PER_MODEL_MB * model_mb + decode_budget_mb + threads * 2 * max_body_mb


def memory_quantity(peak_mb: float, headroom: float = 1.25) -> str:
    """A Kubernetes memory quantity for ``peak_mb`` with ``headroom``, rounded up to 64 Mi."""
    return f"{math.ceil(peak_mb * headroom / 64) * 64}Mi"


def k8s_name(name: str) -> str:
    """A Kubernetes resource name (a DNS-1035 label) for a model name: ``ResNet_18`` -> ``resnet-18``."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)
    if not label or not label[0].isalpha():
        label = f"model-{label}".rstrip("-")
    return label[:63].rstrip("-")


def triton_config(card: ModelCard, *, name: str, max_batch_size: int, instance_count: int = 1,
                  max_queue_delay_us: int = 0) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``) for a carded ONNX model.

    With a dynamic batch, ``max_batch_size`` > 0 and dims exclude the batch dimension (Triton adds it);
    with a fixed batch, ``max_batch_size`` is 0 and dims are the full shapes. Other symbolic dims become -1.
    The first output names ``labels.txt`` so Triton's classification extension returns label names, and the
    card itself is kept under the ``deploykit.card`` parameter for clients that read the model config.
    """
    batched = max_batch_size > 0

    def tensor(spec: TensorSpec, extra: str = "") -> str:
        dims = spec.shape[1:] if batched else spec.shape
        dims_text = ", ".join(str(-1 if isinstance(d, str) else d) for d in dims)
        return (f"  {{\n    name: {_quote(spec.name)}\n    data_type: {_triton_type(spec)}\n"
                f"    dims: [ {dims_text} ]\n{extra}  }}")

    inputs = ",\n".join(tensor(t) for t in card.inputs)
    outputs = ",\n".join(tensor(t, '    label_filename: "labels.txt"\n' if i == 0 else "")
                         for i, t in enumerate(card.outputs))
    parts = [
        f"# Triton model configuration for '{name}', written by deploykit {__version__} from the model card.",
        f"name: {_quote(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        f"input [\n{inputs}\n]",
        f"output [\n{outputs}\n]",
    ]
    if batched:
        delay = f"\n  max_queue_delay_microseconds: {max_queue_delay_us}\n" if max_queue_delay_us else " "
        parts.append(f"dynamic_batching {{{delay}}}")
    parts.append(f"instance_group [\n  {{\n    kind: KIND_CPU\n    count: {instance_count}\n  }}\n]")
    card_value = f"{{ string_value: {_quote(card.to_json())} }}"
    parts.append(f'parameters {{\n  key: "deploykit.card"\n  value: {card_value}\n}}')
    return "\n".join(parts) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal (C escapes; non-ASCII as UTF-8 octal escapes)."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text.encode("utf-8"), as_utf8=False) + '"'


def _triton_type(spec: TensorSpec) -> str:
    try:
        return triton_type(spec.dtype)
    except KeyError:
        raise ModelFileError(f"Tensor {spec.name!r} has dtype {spec.dtype!r}, which Triton does not support.",
                             hint=f"Supported: {', '.join(V2_BY_NUMPY)}.") from None


def _read_checked_card(path: Path) -> ModelCard:
    """The card of ``path``, after checking its tensor names against the graph (Triton checks them too)."""
    proto = load_onnx(path, load_external_data=False)
    card = card_from_metadata({p.key: p.value for p in proto.metadata_props}, origin=str(path))
    initializers = {init.name for init in proto.graph.initializer}
    graph_inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    graph_outputs = [o.name for o in proto.graph.output]
    pairs = (("input", card.inputs, graph_inputs), ("output", card.outputs, graph_outputs))
    for kind, specs, actual in pairs:
        missing = [t.name for t in specs if t.name not in actual]
        if missing:
            raise ModelFileError(
                f"The model card of {str(path)!r} names {kind} {', '.join(missing)}, but the graph's {kind}s "
                f"are {', '.join(actual) or 'none'}.", hint="Export the model again with `deploykit export`.")
    if any("\n" in label or "\r" in label for label in card.labels):
        raise ModelFileError(f"A label in the card of {str(path)!r} contains a line break; Triton's "
                             "labels.txt holds one label per line.")
    return card


def _batch_size(card: ModelCard, requested: int | None) -> int:
    """Triton's ``max_batch_size``: 0 for a fixed-batch model, else the requested or default limit."""
    if not card.dynamic_batch:
        if requested is not None:
            raise UsageError(
                f"The model has a fixed batch size ({card.input.shape[0]}), so --max-batch-size does not "
                "apply.",
                hint="Leave it out, or re-export without --static-batch for a dynamic batch.")
        return 0
    if any(not t.dynamic_batch for t in card.outputs):
        raise ModelFileError("The model's input batch is dynamic but an output's first dimension is fixed; "
                             "Triton needs both to be the batch.",
                             hint="Export it again with `deploykit export`.")
    if requested is not None and requested < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {requested}.")
    return requested if requested is not None else DEFAULT_MAX_BATCH_SIZE


def _external_data(proto: Any, onnx_path: Path) -> list[Path]:
    """Files holding the weights of a model saved with external data (over 2 GB), relative to its folder."""
    locations: set[str] = set()
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return [onnx_path.parent / loc for loc in sorted(locations)]


def _copy_model(onnx_path: Path, target: Path) -> None:
    """Copy the ONNX file, and any external weight files it references, into ``target`` (a file path)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, target)
    for data in _external_data(load_onnx(onnx_path, load_external_data=False), onnx_path):
        if not data.is_file():
            raise ModelFileError(f"{str(onnx_path)!r} keeps its weights in {str(data)!r}, which is missing.",
                                 hint="Keep the external data file beside the model.")
        relative = data.relative_to(onnx_path.parent)
        (target.parent / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data, target.parent / relative)


def _write_triton_repo(root: Path, onnx_path: Path, card: ModelCard, name: str, max_batch_size: int,
                       instance_count: int, max_queue_delay_us: int) -> None:
    model_dir = root / name
    _copy_model(onnx_path, model_dir / "1" / "model.onnx")
    (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in card.labels), encoding="utf-8")
    (model_dir / "config.pbtxt").write_text(
        triton_config(card, name=name, max_batch_size=max_batch_size, instance_count=instance_count,
                      max_queue_delay_us=max_queue_delay_us), encoding="utf-8")


def _write_docker_context(root: Path, onnx_path: Path, name: str, values: dict[str, Any]) -> None:
    """Dockerfile + the deploykit source (package and a generated pyproject) + models/<name>.onnx.

    The source comes from the deploykit that is running, so the image serves exactly this version, and
    ``docker build`` needs only the Python package index (for deploykit's core dependencies).
    """
    package = Path(__file__).resolve().parent
    shutil.copytree(package, root / "deploykit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "pyproject.toml").write_text(core_pyproject(root / "deploykit"), encoding="utf-8")
    # deploykit serve names a model in a folder after its file, so the file name is the model name.
    _copy_model(onnx_path, root / "models" / f"{name}.onnx")
    _render(root / "Dockerfile", "Dockerfile.model", values)
    (root / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n", encoding="utf-8")


def core_pyproject(package_dir: Path) -> str:
    """A minimal ``pyproject.toml`` that installs this deploykit with its core dependencies only.

    Dependencies come from the installed distribution's metadata, without any extra (so never torch), each
    pinned to the version installed here: the image runs what this deploykit was run and tested with.
    Package data globs are derived from the non-Python files found under ``package_dir``.
    """
    try:
        dist = metadata.distribution("deploykit")
        # Keep requirements without an environment marker naming an extra ('torch>=2.6; extra == "torch"').
        requires = [_pinned(r) for r in dist.requires or [] if "extra" not in r.partition(";")[2]]
        python = str(dist.metadata.json.get("requires_python", ">=3.10"))
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        requires, python = [], ">=3.10"
    data_globs = sorted({
        (p.parent.relative_to(package_dir) / "*").as_posix() if p.parent != package_dir else p.name
        for p in package_dir.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
    })
    deps = "".join(f"    {json.dumps(r)},\n" for r in requires)
    return (
        "# Generated by `deploykit package --format docker`: deploykit with its core dependencies only.\n"
        '[build-system]\nrequires = ["setuptools>=68", "wheel"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "deploykit"\nversion = {json.dumps(__version__)}\n'
        f"requires-python = {json.dumps(python)}\ndependencies = [\n{deps}]\n\n"
        '[project.scripts]\ndeploykit = "deploykit.cli:main"\n\n'
        '[tool.setuptools.packages.find]\ninclude = ["deploykit*"]\n\n'
        f"[tool.setuptools.package-data]\ndeploykit = {json.dumps(data_globs)}\n"
    )


def _pinned(requirement: str) -> str:
    """``requirement`` as ``name==version`` of the installed distribution (unchanged when not installed)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if name is None:
        return requirement
    try:
        return f"{name.group(0)}=={metadata.version(name.group(0))}"
    except metadata.PackageNotFoundError:
        return requirement


def _render(target: Path, template: str, values: dict[str, Any]) -> None:
    text = resources.files("deploykit").joinpath("templates", template).read_text(encoding="utf-8")
    target.write_text(Template(text).substitute(values), encoding="utf-8")


@contextlib.contextmanager
def _staging_dir(output: Path, *, force: bool, source: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``output``; on success it replaces ``output``, on failure it is removed.

    Refuses (``UsageError``) to replace a non-empty folder without ``force``, a file, the current folder or
    one of its parents, or a folder holding the model being packaged.
    """
    output = output.expanduser()
    resolved = output.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise UsageError(f"--output {str(output)!r} is a file, not a folder.", hint="Choose a folder path.")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UsageError(f"--output {str(output)!r} is the current folder or one of its parents.",
                         hint="Choose a new folder, e.g. --output build/package.")
    if resolved in source.resolve().parents:
        raise UsageError(f"--output {str(output)!r} contains the model being packaged.",
                         hint="Choose another folder.")
    non_empty = resolved.is_dir() and any(resolved.iterdir())
    if non_empty and not force:
        raise UsageError(f"Output folder {str(output)!r} exists and is not empty.",
                         hint="Choose a new folder, or pass --force to replace it.")
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", suffix=".tmp", dir=resolved.parent))
    except OSError as exc:
        raise UsageError(f"Cannot write to {str(resolved.parent)!r}: {exc.strerror}.",
                         hint="Choose a writable --output folder.") from exc
    old: Path | None = None
    try:
        yield stage
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if non_empty:
            # Move the old folder aside first, so a failure in between loses nothing.
            old = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", suffix=".old", dir=resolved.parent))
            os.replace(resolved, old)
        os.replace(stage, resolved)  # rename(2) also replaces an empty folder
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not resolved.exists():
            os.replace(old, resolved)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
