"""`deploykit package`: ONNX file -> Triton/KServe repository, Docker build context or Kubernetes YAML."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from deploykit.cli._app import app
from deploykit.cli._output import emit_json, out_console


class Format(str, enum.Enum):
    triton = "triton"
    kserve = "kserve"
    docker = "docker"
    k8s = "k8s"


@app.command()
def package(
    model: Path = typer.Argument(..., exists=True, dir_okay=False,
                                 help="An .onnx file from `deploykit export`."),
    format: Format = typer.Option(..., "--format", "-f", help="triton: Triton model repository; kserve: the "
                                  "repository plus an InferenceService; docker: build context of a server "
                                  "image with the model; k8s: Deployment, Service and autoscaler."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to create."),
    name: str | None = typer.Option(None, "--name", help="Model name (default: the model card's)."),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size", help="Triton batch limit for a "
                                              "dynamic-batch model (default: 8, as deploykit serve)."),
    instances: int = typer.Option(1, "--instances", help="Triton CPU instances of the model."),
    image: str | None = typer.Option(None, "--image", help="Image name for docker/k8s "
                                     "(default: deploykit-<name>:<version>)."),
    storage_uri: str | None = typer.Option(None, "--storage-uri", help="KServe storageUri where the "
                                           "repository will be uploaded (default: a placeholder to edit)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Package a model for Triton, KServe, Docker or Kubernetes, from its model card."""
    from deploykit.package import STORAGE_URI_PLACEHOLDER, package_model

    result = package_model(model, format=format.value, output_dir=output, name=name,
                           max_batch_size=max_batch_size, instance_count=instances, image=image,
                           storage_uri=storage_uri or STORAGE_URI_PLACEHOLDER, force=force)
    if as_json:
        emit_json(result.to_dict())
    else:
        out_console.print(str(result), markup=False)
