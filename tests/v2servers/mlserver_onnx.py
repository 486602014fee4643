"""An MLServer inference runtime that runs an ONNX file with ONNX Runtime (a test fixture).

MLServer's documented extension point: an ``MLModel`` subclass named by ``implementation`` in
``model-settings.json``, with the file in ``parameters.uri``. MLServer takes JSON tensors only.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        names = [output.name for output in self._session.get_outputs()]
        values = self._session.run(names, feeds)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output(name, value) for name, value in zip(names, values, strict=True)])
