"""DenseNet-121 layout, checkpoint loading, demo weights and the PXS score."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pxsgate.errors import ModelError
from pxsgate.pxs import (
    DenseNet121,
    PxsSiamese,
    demo_embedding_net,
    load_embedding_net,
    pxs_scores,
    reference_pxs_score,
    remap_legacy_keys,
    state_dict_sha256,
)

# torchvision densenet121 state_dict size, counted: a BatchNorm has 5 entries (weight, bias,
# running_mean, running_var, num_batches_tracked), a bias-free conv 1.
#   conv0 + norm0                              1 + 5      =   6
#   58 dense layers (6+12+24+16) x (norm1, conv1, norm2, conv2) 58 x 12 = 696
#   3 transitions x (norm, conv)               3 x 6      =  18
#   norm5                                                 =   5
#   classifier weight + bias                              =   2
TORCHVISION_DENSENET121_ENTRIES = 6 + 58 * 12 + 3 * 6 + 5 + 2  # 727

SMALL = 64  # the network pools adaptively, so small inputs keep the tests fast


def embed(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = net(batch)
    return out


@pytest.fixture(scope="module")
def demo() -> tuple[DenseNet121, str]:
    return demo_embedding_net()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Five different [3, 64, 64] inputs in [0, 1], grey repeated to 3 channels like PXS's."""
    gen = torch.Generator().manual_seed(7)
    grey = torch.rand(5, 1, SMALL, SMALL, generator=gen)
    ramp = torch.linspace(0, 1, SMALL).expand(SMALL, SMALL)
    grey = grey * torch.tensor([0.2, 0.5, 1.0, 0.1, 0.7]).view(5, 1, 1, 1) + ramp * 0.5
    return grey.clamp(0, 1).repeat(1, 3, 1, 1)


# --- layout -------------------------------------------------------------------------------------


def test_state_dict_has_torchvision_keys_and_shapes() -> None:
    state = DenseNet121().state_dict()
    assert len(state) == TORCHVISION_DENSENET121_ENTRIES == 727
    expected_shapes = {
        "features.conv0.weight": (64, 3, 7, 7),
        "features.norm0.running_var": (64,),
        "features.denseblock1.denselayer1.norm1.weight": (64,),
        "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
        "features.transition1.conv.weight": (128, 256, 1, 1),
        "features.transition3.norm.weight": (1024,),
        "features.denseblock4.denselayer16.conv2.weight": (32, 128, 3, 3),
        "features.denseblock4.denselayer16.norm1.weight": (992,),
        "features.norm5.weight": (1024,),
        "classifier.weight": (1000, 1024),
        "classifier.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    layer = [k for k in state if k.startswith("features.denseblock2.denselayer3.")]
    assert [k.removeprefix("features.denseblock2.denselayer3.") for k in layer] == [
        *(f"norm1.{s}" for s in ("weight", "bias", "running_mean", "running_var")),
        "norm1.num_batches_tracked",
        "conv1.weight",
        *(f"norm2.{s}" for s in ("weight", "bias", "running_mean", "running_var")),
        "norm2.num_batches_tracked",
        "conv2.weight",
    ]
    assert sum(1 for k in state if k.endswith("conv2.weight")) == 58


def test_forward_gives_1000_d_embedding(demo: tuple[DenseNet121, str]) -> None:
    out = embed(demo[0], torch.rand(2, 3, SMALL, SMALL))
    assert out.shape == (2, 1000)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


# --- loading checkpoints -----------------------------------------------------------------------


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision < 0.3 style: 'denselayer1.norm.1.weight', no num_batches_tracked."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for name in ("norm", "relu", "conv"):
            for n in ("1", "2"):
                key = key.replace(f".{name}{n}.", f".{name}.{n}.")
        out[key] = value
    return out


def test_remap_legacy_keys_round_trips(demo: tuple[DenseNet121, str]) -> None:
    state = demo[0].state_dict()
    legacy = _legacy_names(dict(state))
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    remapped = remap_legacy_keys(legacy)
    assert set(remapped) == {k for k in state if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize(
    "variant",
    ["siamese", "siamese-legacy-format", "dataparallel", "wrapped", "torchvision", "legacy"],
)
def test_checkpoint_variants_load_strict_and_embed_identically(
    variant: str, demo: tuple[DenseNet121, str], images: torch.Tensor, tmp_path: Path
) -> None:
    net = demo[0]
    siamese_state = PxsSiamese(net).state_dict()
    plain_state = net.state_dict()
    payload: object = {
        "siamese": siamese_state,
        "siamese-legacy-format": siamese_state,
        "dataparallel": {f"module.{k}": v for k, v in siamese_state.items()},
        "wrapped": {"epoch": 3, "model_state_dict": siamese_state},
        "torchvision": plain_state,
        "legacy": _legacy_names(dict(plain_state)),
    }[variant]
    path = tmp_path / "PXS_score_model.pth"
    # PyTorch 1.5 (the published code's) wrote the pre-zip format; 1.6+ writes zip files.
    torch.save(payload, path, _use_new_zipfile_serialization=variant != "siamese-legacy-format")
    loaded, sha = load_embedding_net(path, device="cpu")
    assert isinstance(loaded, DenseNet121)
    assert not loaded.training
    assert len(sha) == 64
    assert torch.equal(embed(loaded, images), embed(net, images))


# torch 2.13 deprecates torch.jit; sites may still hold TorchScript exports, so it is supported.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_files_load(
    demo: tuple[DenseNet121, str], images: torch.Tensor, tmp_path: Path
) -> None:
    net = demo[0]
    example = images[:1]
    # torch.jit.trace carries no type annotations (torch 2.13), hence the ignores.
    traced_net = tmp_path / "net.pt"
    traced = torch.jit.trace(net, example, check_trace=False)  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(traced_net))
    traced_siamese = tmp_path / "siamese.pt"
    siamese = torch.jit.trace(  # type: ignore[no-untyped-call]
        PxsSiamese(net).eval(), (example, example), check_trace=False
    )
    torch.jit.save(siamese, str(traced_siamese))
    expected = embed(net, images)
    for path in (traced_net, traced_siamese):
        loaded, _ = load_embedding_net(path, device="cpu")
        torch.testing.assert_close(embed(loaded, images), expected, rtol=1e-5, atol=1e-6)


def test_weights_sha_is_of_the_file(demo: tuple[DenseNet121, str], tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "w.pth"
    torch.save(demo[0].state_dict(), path)
    _, sha = load_embedding_net(str(path))
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_files_raise_model_error(demo: tuple[DenseNet121, str], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_embedding_net(tmp_path / "absent.pth")

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        load_embedding_net(text)

    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), other)
    with pytest.raises(ModelError, match=r"missing keys \[.*unexpected keys \['bias', 'weight'\]"):
        load_embedding_net(other)

    state = dict(demo[0].state_dict())
    del state["features.norm5.weight"]
    state["features.norm6.weight"] = torch.ones(1024)
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ModelError, match=r"features\.norm5\.weight.*features\.norm6\.weight"):
        load_embedding_net(partial)

    small = tmp_path / "ten_classes.pth"
    torch.save(DenseNet121(num_classes=10).state_dict(), small)
    with pytest.raises(ModelError, match="does not fit"):
        load_embedding_net(small)

    not_tensors = tmp_path / "dict.pth"
    torch.save({"lr": 0.1}, not_tensors)
    with pytest.raises(ModelError, match="not a state_dict"):
        load_embedding_net(not_tensors)


# --- demonstration weights -------------------------------------------------------------------


def test_demo_weights_are_deterministic(demo: tuple[DenseNet121, str]) -> None:
    rng_before = torch.random.get_rng_state()
    again, sha = demo_embedding_net()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert sha == demo[1] == state_dict_sha256(again)
    for (key, a), (_, b) in zip(
        demo[0].state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
    other, other_sha = demo_embedding_net(seed=1)
    assert other_sha != sha
    assert not torch.equal(other.classifier.weight, again.classifier.weight)
    assert not again.training


# --- scoring --------------------------------------------------------------------------------------


def test_pxs_scores_median_averages_the_two_middle_values() -> None:
    image = torch.zeros(1, 4)
    # Anchors at distances 1, 2, 3 and 10 (plus F.pairwise_distance's 1e-6 per component).
    anchors = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 10.0]])
    score = pxs_scores(image, anchors)
    assert score.dtype == torch.float64
    assert score.shape == (1,)
    assert float(score[0]) == pytest.approx(2.5, abs=1e-5)  # statistics.median, not torch's 2.0
    assert float(pxs_scores(image, anchors[:3])[0]) == pytest.approx(2.0, abs=1e-5)


def test_pxs_scores_distance_is_pairwise_distance_anchor_first() -> None:
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(3, 1000, generator=gen, dtype=torch.float64)
    anchors = torch.randn(6, 1000, generator=gen, dtype=torch.float64)
    expected = [
        statistics.median(F.pairwise_distance(anchors, row.expand_as(anchors)).tolist())
        for row in images
    ]
    assert pxs_scores(images, anchors).tolist() == pytest.approx(expected, rel=1e-12)
    same = pxs_scores(anchors[:1], anchors[:1])
    assert float(same[0]) == pytest.approx(np.sqrt(1000) * 1e-6, rel=1e-6)


def test_pxs_scores_rejects_bad_shapes() -> None:
    with pytest.raises(ModelError):
        pxs_scores(torch.zeros(2, 1000), torch.zeros(0, 1000))
    with pytest.raises(ModelError):
        pxs_scores(torch.zeros(2, 1000), torch.zeros(3, 999))


def test_cached_scores_equal_the_published_uncached_algorithm(
    demo: tuple[DenseNet121, str], images: torch.Tensor
) -> None:
    net = demo[0]
    siamese = PxsSiamese(net)
    anchors = images[1:]  # an even pool (4) exercises the two-middle-values median
    cached = pxs_scores(embed(net, images[:2]), embed(net, anchors))
    for i in range(2):
        reference = reference_pxs_score(siamese, images[i], anchors)
        assert abs(float(cached[i]) - reference) < 1e-4
        assert float(cached[i]) == pytest.approx(reference, rel=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_unavailable_device_is_a_model_error(demo: tuple[DenseNet121, str], tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(demo[0].state_dict(), path)
    with pytest.raises(ModelError, match="device 'cuda'"):
        load_embedding_net(path, device="cuda")
