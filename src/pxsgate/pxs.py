"""The PXS model: a Siamese DenseNet-121 and the median-distance-to-normal-anchors score.

Source: QTIM-Lab/PXS-score (MIT). PXS_classes.py: ``SiameseNetwork_DenseNet121`` holds
``torch.hub.load('pytorch/vision:v0.5.0', 'densenet121', pretrained=True)`` as ``cnn0``,
1000-way ImageNet classifier kept, and ``forward(a, b)`` runs both images through it.
PXS_test.py / PXS_test_direct_from_DICOM.py, ``anchor_inference``: for every anchor j,
``output1, output2 = net.forward(img_anchor[j], img_comparison)``,
``F.pairwise_distance(output1, output2)``, then ``statistics.median`` of the distances.

Two details of that code are kept on purpose:
- ``F.pairwise_distance`` is ``||x1 - x2 + eps||_2`` with eps = 1e-6, and x1 is the anchor;
- ``statistics.median`` averages the two middle values when the pool size is even
  (``torch.median`` would return the lower one).

This module has no torchvision dependency: ``DenseNet121`` re-creates torchvision's module
tree (torchvision/models/densenet.py) so that its checkpoints load with strict=True.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxsgate.errors import ModelError

__all__ = [
    "DEMO_SEED",
    "DenseNet121",
    "PxsSiamese",
    "demo_embedding_net",
    "file_sha256",
    "load_embedding_net",
    "pxs_scores",
    "reference_pxs_score",
    "remap_legacy_keys",
    "state_dict_sha256",
]

DEMO_SEED = 20200523
EMBEDDING_DIM = 1000
# torch.nn.functional.pairwise_distance's default eps, added to the difference before the norm.
PAIRWISE_EPS = 1e-6

# torchvision densenet.py, _load_state_dict: checkpoints from before torchvision 0.3 name the
# dense-layer modules "norm.1", "conv.2"... instead of "norm1", "conv2".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_WRAPPER_KEYS = ("state_dict", "model_state_dict")


# --- DenseNet-121, module for module as torchvision --------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck, bn_size * growth channels) then BN-ReLU-Conv3x3 (growth)."""

    def __init__(self, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        # Attribute order fixes the state_dict key order; it is torchvision's.
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth, 1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, stride=1, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        concatenated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        out: Tensor = self.conv2(self.relu2(self.norm2(bottleneck)))
        return out  # drop_rate is 0 in densenet121, so no dropout


class _DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(in_channels + i * growth, growth, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet121(nn.Module):
    """torchvision's densenet121 (growth 32, blocks (6, 12, 24, 16), 64 initial features,
    bn_size 4, 1000 classes); forward returns the 1000-d classifier output, the PXS embedding.
    """

    def __init__(
        self,
        growth: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = EMBEDDING_DIM,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, init_features, 7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        channels = init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, channels, growth, bn_size)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # torchvision DenseNet.forward: the final ReLU and pooling are functional, not modules.
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        embedding: Tensor = self.classifier(out)
        return embedding


class PxsSiamese(nn.Module):
    """The published checkpoint layout: the twin DenseNet is ``cnn0`` (keys ``cnn0.*``)."""

    def __init__(self, cnn0: nn.Module | None = None) -> None:
        super().__init__()
        self.cnn0 = cnn0 if cnn0 is not None else DenseNet121()

    def forward_once(self, x: Tensor) -> Tensor:
        out: Tensor = self.cnn0(x)
        return out

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_once(x1), self.forward_once(x2)


# --- loading weights ------------------------------------------------------------------------


def load_embedding_net(
    weights: str | Path, *, device: torch.device | str = "cpu"
) -> tuple[nn.Module, str]:
    """Load the embedding network (eval mode, on ``device``) and the sha256 of the weights file.

    Accepts a Siamese state_dict (``cnn0.`` keys, the published layout), a plain torchvision
    densenet121 state_dict, either wrapped in ``{"state_dict": ...}`` /
    ``{"model_state_dict": ...}`` or carrying a DataParallel ``module.`` prefix, and
    TorchScript files. State dicts load with strict=True; any problem raises ModelError.
    """
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    digest = file_sha256(path)
    net = _load_torchscript(path) if _is_torchscript(path) else _load_state_dict_net(path)
    try:
        net = net.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:  # CPU-only torch raises Assertion
        raise ModelError(f"cannot move the model to device {device!r}: {exc}") from exc
    return net.eval(), digest


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl``; torch.save files are not."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _load_torchscript(path: Path) -> nn.Module:
    try:
        # torch.jit.load carries no type annotations (torch 2.13)
        module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch.jit raises RuntimeError and friends; translate here
        raise ModelError(f"{path}: cannot load TorchScript: {exc}") from exc
    # A scripted Siamese takes two inputs; its scripted twin is the embedding network.
    net: nn.Module = getattr(module, "cnn0", module)
    _probe_embedding_net(net, path)
    return net


def _probe_embedding_net(net: nn.Module, path: Path) -> None:
    """A TorchScript file has no keys to check, so check what it computes on one input."""
    try:
        with torch.inference_mode():
            out = net.eval()(torch.zeros(1, 3, 320, 320))
    except Exception as exc:  # any failure here means the module is not an embedding net
        raise ModelError(f"{path}: TorchScript module fails on a 1x3x320x320 input: {exc}") from exc
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, EMBEDDING_DIM):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"{path}: TorchScript module returns {shape}, not (1, {EMBEDDING_DIM})")


def _load_state_dict_net(path: Path) -> nn.Module:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors have many types
        raise ModelError(f"{path}: not a PyTorch checkpoint: {exc}") from exc
    state = remap_legacy_keys(_strip_module_prefix(_unwrap_state_dict(loaded, path)))
    if any(key.startswith("cnn0.") for key in state):
        siamese = PxsSiamese()
        _load_strict(siamese, state, path)
        return siamese.cnn0
    net = DenseNet121()
    _load_strict(net, state, path)
    return net


def _unwrap_state_dict(loaded: object, path: Path) -> dict[str, Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper in _WRAPPER_KEYS:
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ModelError(f"{path}: not a state_dict (got {type(loaded).__name__})")
    bad = [str(k) for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ModelError(f"{path}: not a state_dict of tensors (e.g. entry {bad[0]!r})")
    return dict(loaded)


def _strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """nn.DataParallel saves its wrapped module's keys as ``module.<key>``."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def remap_legacy_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``...denselayerN.norm.1.weight`` style keys to ``...denselayerN.norm1.weight``."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _LEGACY_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _load_strict(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    _fill_num_batches_tracked(state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{path}: not a DenseNet-121 PXS checkpoint: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"{path}: checkpoint does not fit DenseNet-121: {exc}") from exc


def _fill_num_batches_tracked(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Checkpoints from before PyTorch 0.4.1 lack BatchNorm's ``num_batches_tracked``.

    torch's own BatchNorm loader (_NormBase._load_from_state_dict, version < 2) supplies 0
    for it; it is a training counter that eval-mode inference never reads.
    """
    for key in expected:
        prefix = key.removesuffix("num_batches_tracked")
        if prefix != key and key not in state and prefix + "running_mean" in state:
            state[key] = torch.tensor(0, dtype=torch.long)


# --- demonstration weights --------------------------------------------------------------------


def demo_embedding_net(seed: int = DEMO_SEED) -> tuple[DenseNet121, str]:
    """Deterministic, uncalibrated weights for demonstrations; never for clinical use.

    Initialised as torchvision initialises DenseNet (kaiming_normal_ convolutions, BatchNorm
    weight 1 / bias 0, Linear bias 0), from a local generator so the global RNG is untouched;
    the Linear weight, left to PyTorch's default in torchvision, is drawn N(0, 0.01) here.
    Same seed and PyTorch version give the same weights; the sha256 names them in results.
    """
    generator = torch.Generator().manual_seed(seed)
    # Built on the meta device: the default initialisers would otherwise draw from (and
    # advance) the global RNG. to_empty allocates; every tensor is then set below.
    with torch.device("meta"):
        net = DenseNet121()
    net.to_empty(device="cpu")
    with torch.no_grad():
        for module in net.modules():
            _init_module(module, generator)
    net.eval()
    return net, state_dict_sha256(net)


def _init_module(module: nn.Module, generator: torch.Generator) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, generator=generator)
    elif isinstance(module, nn.BatchNorm2d):
        module.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1, count 0
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01, generator=generator)
        nn.init.zeros_(module.bias)


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the state_dict in key order: each key, dtype, shape and raw tensor bytes."""
    sha = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        sha.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


# --- scoring ----------------------------------------------------------------------------------


def pxs_scores(embeddings: Tensor, anchors: Tensor) -> Tensor:
    """PXS score of each embedding: the median distance to the anchor embeddings, float64.

    As the published ``anchor_inference``: distance = ``||anchor - image + 1e-6||_2``
    (F.pairwise_distance with the anchor first) and the median of an even count averages
    the two middle values (statistics.median). Computed in float64 on the CPU.
    """
    if embeddings.ndim != 2 or anchors.ndim != 2 or embeddings.shape[1] != anchors.shape[1]:
        raise ModelError(
            f"embeddings {tuple(embeddings.shape)} and anchors {tuple(anchors.shape)} differ"
        )
    if anchors.shape[0] == 0:
        raise ModelError("no anchor embeddings")
    images = embeddings.detach().to("cpu", torch.float64)
    pool = anchors.detach().to("cpu", torch.float64)
    scores = [_median(torch.linalg.vector_norm(pool - row + PAIRWISE_EPS, dim=1)) for row in images]
    return torch.tensor(scores, dtype=torch.float64)


def _median(values: Tensor) -> float:
    """statistics.median: the middle value, or the mean of the two middle values."""
    ordered = torch.sort(values).values
    mid = ordered.numel() // 2
    if ordered.numel() % 2:
        return float(ordered[mid])
    return (float(ordered[mid - 1]) + float(ordered[mid])) / 2


def reference_pxs_score(siamese: PxsSiamese, image: Tensor, anchor_images: Tensor) -> float:
    """The published, uncached algorithm (two forward passes per anchor); for tests."""
    siamese.eval()
    comparison = image.unsqueeze(0)
    distances: list[float] = []
    with torch.inference_mode():
        for j in range(anchor_images.shape[0]):
            output1, output2 = siamese(anchor_images[j : j + 1], comparison)
            distances.append(F.pairwise_distance(output1, output2).item())
    return float(statistics.median(distances))
