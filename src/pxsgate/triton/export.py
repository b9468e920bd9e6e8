"""``pxsgate model export``: a Triton model repository entry for the configured weights.

The entry is ``OUT/<model-name>/config.pbtxt`` and ``OUT/<model-name>/1/<model file>``:

- ``onnx``: ``model.onnx`` for Triton's onnxruntime backend (``onnxruntime_onnx``);
- ``torchscript``: ``model.pt`` for Triton's PyTorch backend (``pytorch_libtorch``);
- ``python``: ``model.pt`` and pxsgate's ``model.py`` for Triton's Python backend, for a
  Triton without the other two (the CPU tritonserver of PyPI's nvidia-pytriton wheel).

The served model is the embedding twin only (the DenseNet-121); the anchors, the median
distance and the change stay in pxsgate. It takes the 8-bit model images, uint8
[N, 320, 320], and does the ToTensor conversion itself (pxsgate.infer.levels_to_input,
traced into it), so 100 KB per image cross the network instead of 1.2 MB of float32.
``config.pbtxt`` turns on Triton's dynamic batcher and records the weights' sha256 as a
parameter, which pxsgate checks at start-up against the weights it is configured for.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from pxsgate.config import ModelConfig
from pxsgate.errors import ModelError
from pxsgate.infer import levels_to_input, load_weights, to_tensor_table
from pxsgate.preprocess import CROP_TO
from pxsgate.pxs import EMBEDDING_DIM

ExportFormat = Literal["onnx", "torchscript", "python"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("onnx", "torchscript", "python")
# The pytorch_libtorch backend matches tensors to the forward pass by "<name>__<index>";
# the ONNX and Python entries use the same names, so clients need not know the format.
INPUT_NAME = "IMAGES__0"
OUTPUT_NAME = "EMBEDDINGS__0"
WEIGHTS_PARAMETER = "pxsgate_weights_sha256"
ONNX_OPSET = 17
PYTHON_BACKEND_MODEL = Path(__file__).with_name("python_backend") / "model.py"
_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "python": "model.pt"}
_BACKENDS = {"onnx": 'platform: "onnxruntime_onnx"',
             "torchscript": 'platform: "pytorch_libtorch"',
             "python": 'backend: "python"'}


class ServedEmbedder(nn.Module):
    """uint8 model images [N, 320, 320] -> embeddings [N, 1000] (float32): the ToTensor
    lookup table as a buffer, then the embedding network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("table", to_tensor_table())

    def forward(self, images: Tensor) -> Tensor:
        out: Tensor = self.net(levels_to_input(images, self.get_buffer("table")))
        return out


@dataclass(frozen=True)
class Exported:
    entry: Path  # OUT/<model-name>
    model_file: Path
    weights_sha256: str


def export_model(config: ModelConfig, out: Path, fmt: ExportFormat, *,
                 model_name: str | None = None) -> Exported:
    """Write the entry for ``config``'s weights (fp32, on the CPU) under ``out``."""
    name = model_name or config.triton.model_name
    net, sha, _ = load_weights(config, torch.device("cpu"))
    module = ServedEmbedder(net.eval()).eval()
    entry = out / name
    version = entry / "1"
    version.mkdir(parents=True, exist_ok=True)
    target = version / _FILES[fmt]
    example = torch.zeros((2, CROP_TO, CROP_TO), dtype=torch.uint8)
    try:
        if fmt == "onnx":
            _export_onnx(module, example, target)
        else:
            with torch.no_grad():
                # torch.jit.trace carries no type annotations (torch 2.13)
                traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
            traced.save(str(target))
            if fmt == "python":
                shutil.copyfile(PYTHON_BACKEND_MODEL, version / "model.py")
    except ModelError:
        raise
    except Exception as exc:  # tracing and the exporters raise many types
        raise ModelError(f"cannot export the model as {fmt}: {exc}") from exc
    (entry / "config.pbtxt").write_text(
        model_config(name, fmt, sha, config.batch.max_size, config.batch.max_delay_ms),
        encoding="utf-8")
    return Exported(entry, target, sha)


def _export_onnx(module: nn.Module, example: Tensor, target: Path) -> None:
    try:
        import onnx  # noqa: F401  # torch.onnx.export needs it
    except ImportError:
        raise ModelError("ONNX export needs the onnx package: pip install onnx") from None
    # The TorchScript-based exporter (dynamo=False): the dynamo one needs onnxscript as
    # well, and both give the same graph for this plain convolutional network.
    torch.onnx.export(module, (example,), str(target), input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET, dynamo=False,
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def model_config(name: str, fmt: ExportFormat, weights_sha256: str, max_batch_size: int,
                 max_delay_ms: float) -> str:
    """config.pbtxt: uint8 [-1, 320, 320] in, float32 [-1, 1000] out, the dynamic batcher
    (model.batch.max-size and max-delay-ms), the weights' sha256."""
    return f"""name: "{name}"
{_BACKENDS[fmt]}
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: [ {CROP_TO}, {CROP_TO} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {EMBEDDING_DIM} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {round(max_delay_ms * 1000)}
}}
parameters {{
  key: "{WEIGHTS_PARAMETER}"
  value {{ string_value: "{weights_sha256}" }}
}}
"""
