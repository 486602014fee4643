# deploykit's own server image: small, without torch (core install only), non-root.
#   docker build -t deploykit .
#   docker run --rm -p 8080:8080 -v "$PWD/models:/models:ro" deploykit
# serves every *.onnx in /models (named after the file) on 0.0.0.0:8080. Extra `docker run` arguments replace
# the default CMD, e.g. `docker run ... deploykit /models --threads 16`. For an image with the model inside,
# use `deploykit package MODEL.onnx --format docker --output DIR`, which writes a build context from this recipe.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Core install: `pip install .` without the [torch] extra (export and verify stay on the build machine).
COPY pyproject.toml README.md /tmp/deploykit-src/
COPY deploykit /tmp/deploykit-src/deploykit
RUN pip install /tmp/deploykit-src && rm -rf /tmp/deploykit-src

# A fixed numeric UID, so that Kubernetes can verify runAsNonRoot.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin deploykit \
    && mkdir /models && chown 10001:10001 /models
USER 10001
WORKDIR /models

EXPOSE 8080
# slim has no curl: probe the V2 live endpoint with Python's urllib (a non-2xx answer raises, exit 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=4)"]
ENTRYPOINT ["deploykit", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["/models", "--graceful-timeout", "30"]
