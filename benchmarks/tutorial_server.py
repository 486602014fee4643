"""The classic PyTorch Flask tutorial server, the baseline of ``bench_serve.py``.

It follows "Deploying PyTorch in Python via a REST API with Flask" (pytorch.org tutorials) as written: Flask's
development server, an eager PyTorch model in ``eval()`` mode called without ``torch.no_grad()``, and a
torchvision transform pipeline built per request (Resize(256), CenterCrop(224), ToTensor, Normalize). The
only differences: resnet18 with the same seeded random weights as ``deploykit export resnet18 --weights none``
(no pretrained weights can be downloaded here), ImageNet labels from torchvision's metadata instead of a JSON
file, and host/port options.

Run: ``python benchmarks/tutorial_server.py --port 5001`` then
``curl -F file=@cat.jpg http://127.0.0.1:5001/predict``.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torchvision import models, transforms

app = Flask(__name__)
model: torch.nn.Module = torch.nn.Identity()
categories: list[str] = []


def load_model(arch: str, seed: int) -> None:
    """Random weights seeded as deploykit's ``weights="none"`` export does, so both serve the same network."""
    global model, categories
    torch.manual_seed(seed)
    model = models.get_model(arch, weights=None)
    model.eval()
    categories = list(models.get_model_weights(arch).DEFAULT.meta["categories"])


def transform_image(image_bytes: bytes) -> torch.Tensor:
    my_transforms = transforms.Compose([transforms.Resize(256),
                                        transforms.CenterCrop(224),
                                        transforms.ToTensor(),
                                        transforms.Normalize(
                                            [0.485, 0.456, 0.406],
                                            [0.229, 0.224, 0.225])])
    image = Image.open(io.BytesIO(image_bytes))
    return my_transforms(image).unsqueeze(0)


def get_prediction(image_bytes: bytes) -> tuple[str, str]:
    tensor = transform_image(image_bytes=image_bytes)
    outputs = model.forward(tensor)
    _, y_hat = outputs.max(1)
    predicted_idx = int(y_hat.item())
    return str(predicted_idx), categories[predicted_idx]


@app.route("/predict", methods=["POST"])
def predict() -> Any:  # the tutorial's handler, kept as written
    if request.method == "POST":
        file = request.files["file"]
        img_bytes = file.read()
        class_id, class_name = get_prediction(image_bytes=img_bytes)
        return jsonify({"class_id": class_id, "class_name": class_name})
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--seed", type=int, default=0, help="deploykit's export seed for weights='none' (0)")
    args = parser.parse_args()
    load_model(args.arch, args.seed)
    app.run(host=args.host, port=args.port)


if __name__ == "__main__":
    main()
