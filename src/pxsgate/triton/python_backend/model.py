"""Triton's Python backend serving the TorchScript export of ``pxsgate model export``.

For a Triton without the PyTorch backend: the tritonserver that PyPI's ``nvidia-pytriton``
wheel ships (CPU, used by pxsgate's tests and benchmarks) has only this one. The stub runs
it in a Python that must import torch and numpy (same minor version as the stub).

The dynamic batcher hands ``execute`` every request it gathered: they go through the
network as one forward pass, and each request gets its own rows back. The module takes the
uint8 images and does the ToTensor conversion itself (pxsgate.infer.levels_to_input,
traced into it), so what crosses the wire is 100 KB per image.

Tensors go in and out by DLPack, not numpy: the stub's numpy binding is built against numpy
1.x, and with numpy 2 its pb_utils.Tensor(name, ndarray) answers empty outputs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub
from torch.utils.dlpack import from_dlpack


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.input_name = str(config["input"][0]["name"])
        self.output_name = str(config["output"][0]["name"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        # torch.jit.load carries no type annotations (torch 2.13)
        self.module = torch.jit.load(path, map_location="cpu").eval()  # type: ignore[no-untyped-call]

    def execute(self, requests: list[Any]) -> list[Any]:
        batches = [from_dlpack(pb_utils.get_input_tensor_by_name(r, self.input_name)
                               .to_dlpack()) for r in requests]
        with torch.inference_mode():
            out = self.module(torch.cat(batches)).contiguous()
        responses = []
        for rows in out.split([len(b) for b in batches]):
            tensor = pb_utils.Tensor.from_dlpack(self.output_name, rows.__dlpack__())
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
