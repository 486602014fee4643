"""KServe's Python model server with a model that runs an ONNX file with ONNX Runtime (a test fixture).

    python kserve_onnx.py MODEL.onnx NAME PORT

``kserve.Model`` is KServe's documented extension point; ``kserve.ModelServer`` serves it (REST, no gRPC).
KServe reads binary tensor data (Triton's extension) without listing it in ``GET /v2``. The model metadata
lists the ONNX inputs and outputs (``kserve.Model`` lists none unless told).
"""

import sys
import uuid

import uvicorn


class _LoopbackConfig(uvicorn.Config):
    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **{**kwargs, "host": "127.0.0.1"})


# KServe's REST server always listens on 0.0.0.0 (kserve/kserve#4558); a test listens on loopback only. The
# fixture that starts this program checks the listening address, so a KServe that stops building its server
# through uvicorn.Config fails the test instead of listening on every interface.
uvicorn.Config = _LoopbackConfig  # type: ignore[misc]

import kserve  # noqa: E402
import onnxruntime as ort  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402

DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
             "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(uint8)": "UINT8"}


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def _types(self, tensors: list) -> list[dict]:
        return [{"name": t.name, "datatype": DATATYPES[t.type],
                 "shape": [d if isinstance(d, int) else -1 for d in t.shape]} for t in tensors]

    def get_input_types(self) -> list[dict]:
        return self._types(self.session.get_inputs())

    def get_output_types(self) -> list[dict]:
        return self._types(self.session.get_outputs())

    def predict(self, payload: InferRequest, headers: dict | None = None,
                response_headers: dict | None = None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        specs = self.session.get_outputs()
        outputs = []
        for spec, value in zip(specs, self.session.run([s.name for s in specs], feeds), strict=True):
            output = InferOutput(name=spec.name, shape=list(value.shape), datatype=DATATYPES[spec.type])
            output.set_data_from_numpy(value)
            outputs.append(output)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             infer_outputs=outputs, use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


if __name__ == "__main__":
    path, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = OnnxModel(name, path)
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([model])
