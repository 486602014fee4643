"""`deploykit serve`: serve ONNX models over HTTP (deploykit REST API + Open Inference Protocol)."""

from __future__ import annotations

import typer

from deploykit.cli._app import app
from deploykit.cli._output import info


@app.command()
def serve(
    models: list[str] | None = typer.Argument(
        None,
        metavar="MODEL",
        help=".onnx file, folder of them, model repository (<name>/<version>/model.onnx) or name=path "
        "(default: the .onnx files in the current folder).",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server."),
    port: int = typer.Option(5000, "--port", help="Port to listen on."),
    threads: int = typer.Option(
        8, "--threads", help="Threads that handle requests (each request arrives whole before one takes it)."
    ),
    max_connections: int = typer.Option(
        1000, "--max-connections", help="Most connections open at once; more wait until some close."
    ),
    max_batch_size: int | None = typer.Option(
        None,
        "--max-batch-size",
        help="Most images per ONNX Runtime call (default: 2 when calls run side by side on CPU, else 8).",
    ),
    instances: int | None = typer.Option(
        None,
        "--instances",
        help="ONNX Runtime calls in flight at once per model (Triton's count; default: one per core on CPU).",
    ),
    max_batch_delay_ms: float = typer.Option(
        5.0, "--max-batch-delay-ms", help="Longest wait to fill a batch."
    ),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests queued per model before answering 503."),
    request_timeout: float = typer.Option(
        30.0, "--request-timeout", help="Seconds a request may wait (504)."
    ),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="Largest request body in MB (413)."),
    decode_budget_mb: float = typer.Option(
        320.0,
        "--decode-budget-mb",
        help="Memory for the images being decoded at once; more wait for room (504 past --request-timeout), "
        "an image that needs more than all of it is refused (413).",
    ),
    exact_decode: bool = typer.Option(
        False,
        "--exact-decode",
        help="Decode every image at full size, bit-identical to torchvision's transforms (default: a large "
        "photo is decoded at the size the model needs).",
    ),
    max_request_images: int = typer.Option(
        64, "--max-request-images", help="Most images (or V2 batch rows) in one request (413)."
    ),
    graceful_timeout: float = typer.Option(
        30.0, "--graceful-timeout", help="Seconds to finish requests on SIGTERM."
    ),
    client_timeout: int = typer.Option(
        10,
        "--client-timeout",
        help="Seconds a connection may stay silent (idle, stalled in a request, or reading nothing of an "
        "answer) before it is closed.",
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="DEPLOYKIT_API_KEY",
        show_envvar=True,
        help="Require this key (Authorization: Bearer or X-API-Key).",
    ),
    cors_origin: list[str] | None = typer.Option(
        None,
        "--cors-origin",
        help="Allow browser calls from this origin (repeatable, * for any). No CORS by default.",
    ),
    intra_op_threads: int | None = typer.Option(
        None,
        "--intra-op-threads",
        help="ONNX Runtime threads per call (default: a call alone gets every core, calls side by side share "
        "them).",
    ),
    provider: list[str] | None = typer.Option(
        None, "--provider", help="ONNX Runtime provider (cpu, cuda...)."
    ),
    no_self_test: bool = typer.Option(
        False, "--no-self-test", help="Skip the fingerprint self-test; ready as soon as the models load."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve models: POST /predict, the Open Inference Protocol at /v2, /metrics, and a web page at /."""
    from deploykit.serve.config import ServeConfig, parse_model_specs
    from deploykit.serve.server import run_server

    if log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    config = ServeConfig(
        models=parse_model_specs(models or []),
        host=host,
        port=port,
        threads=threads,
        max_connections=max_connections,
        max_batch_size=max_batch_size,
        instances=instances,
        max_batch_delay_ms=max_batch_delay_ms,
        max_queue=max_queue,
        request_timeout=request_timeout,
        max_body_mb=max_body_mb,
        max_request_images=max_request_images,
        decode_budget_mb=decode_budget_mb,
        exact_decode=exact_decode,
        graceful_timeout=graceful_timeout,
        api_key=api_key,
        cors_origins=tuple(cors_origin or ()),
        intra_op_threads=intra_op_threads,
        providers=tuple(provider or ("cpu",)),
        self_test=not no_self_test,
        log_level=log_level.lower(),
        client_timeout=client_timeout,
    )
    raise typer.Exit(run_server(config, announce=info))
