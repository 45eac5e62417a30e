"""The ``features`` config section: what a feature set is (its identity) and how it is computed.

:class:`FeatureIdentity` is everything that changes a feature set's numbers; it is hashed into the
feature key (``<backbone>-<hash>``, the feature set's folder name) and recorded in every
checkpoint, so prediction recomputes exactly the features a model was trained on.
:class:`FeaturesConfig` adds the settings that only change speed (shard and batch sizes, threads,
Dask) and the device (which changes only the last bits: CUDA runs the backbone in half precision).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lesa_common import StrictModel
from lesa_model import backbones
from lesa_model.backbones import Backbone, BackboneChoice, PreprocessingName, WeightsOpener
from lesa_model.config import BACKBONE_BATCH
from tasks import schemas
from tasks.feature_shards import FORMAT_VERSION
from tasks.hashing import content_hash
from tasks.storage import Storage


class FeatureIdentity(StrictModel):
    """What a feature set is computed with: backbone, weights, input size, preprocessing, dtype."""

    backbone: str = "efficientnet-lite0"
    """A name in :data:`lesa_model.backbones.REGISTRY`."""
    weights: str = backbones.PRETRAINED
    """``imagenet``, ``none`` (random; tests only) or a weights file path/URL."""
    image_size: int = Field(224, ge=16)
    preprocessing: PreprocessingName | None = None
    """None: the backbone's default for its weights (torchvision for vgg19)."""
    dtype: str = "float16"

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return backbones.get_entry(value).name

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in schemas.FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {schemas.FEATURE_DTYPES}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _backbone_fits(self) -> FeatureIdentity:
        self.choice  # noqa: B018 - raises a BackboneError when the combination does not fit
        return self

    @property
    def choice(self) -> BackboneChoice:
        """The checked backbone, preprocessing and image size."""
        return backbones.choose(self.backbone, self.preprocessing, self.image_size)

    @property
    def preprocessing_id(self) -> str:
        """The resolved preprocessing identifier written into shards and the manifest."""
        return self.choice.preprocessing_id

    @property
    def grid(self) -> tuple[int, int]:
        """Region grid (h, w) the backbone gives at ``image_size``."""
        return self.choice.grid

    @property
    def dim(self) -> int:
        """Feature dimension (D) of the backbone."""
        return self.choice.entry.dim

    def identity(self) -> FeatureIdentity:
        """Just the identity fields (a :class:`FeaturesConfig` without its speed settings)."""
        return FeatureIdentity.model_validate(
            self.model_dump(include=set(FeatureIdentity.model_fields))
        )

    def recipe(self) -> backbones.FeatureRecipe:
        """The recipe a portable checkpoint carries (the preprocessing resolved)."""
        return backbones.FeatureRecipe(
            self.backbone, self.weights, self.image_size, self.preprocessing_id, self.dtype
        )

    def build_backbone(self, open_weights: WeightsOpener | None = None) -> Backbone:
        """The backbone these features come from, in eval mode on the CPU."""
        return backbones.load_backbone(
            self.backbone,
            weights=self.weights,
            image_size=self.image_size,
            preprocessing=self.preprocessing,
            open_weights=open_weights,
        )


class DaskConfig(StrictModel):
    """Where shards run: a LocalCluster (default) or any running scheduler by address."""

    address: str | None = None
    """``tcp://host:8786`` of a running scheduler (Kubernetes, HPC, ...); None starts a
    LocalCluster on 127.0.0.1 with the settings below."""
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = True
    dashboard: bool = True
    """Serve (and print the link to) the Dask dashboard; needs the ``bokeh`` package."""


class FeaturesConfig(FeatureIdentity):
    """How features are computed and stored. Only the :class:`FeatureIdentity` fields change the
    numbers; ``shard_size``, ``batch_size``, ``torch_threads`` and ``dask`` only change speed,
    and ``device`` only the last bits (CUDA runs the backbone in half precision)."""

    shard_size: int = Field(1024, ge=1)
    batch_size: int = Field(BACKBONE_BATCH, ge=1)
    """Images per backbone forward pass, and HDF5 chunk rows (as many as a training batch of
    the default ``train.batch_size``, so a batch reads whole chunks)."""
    torch_threads: int | None = Field(None, ge=1)
    """Intra-op threads per task; None: the host's cores / (worker threads on that host)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` (CUDA when the worker has it, with half precision), ``cpu`` or ``cuda``."""
    dask: DaskConfig = Field(default_factory=DaskConfig)


def feature_key(identity: FeatureIdentity) -> str:
    """``<backbone>-<hash>`` naming a feature set by everything that changes its numbers."""
    fields = {
        "backbone": identity.backbone,
        "weights": identity.weights,
        "image_size": identity.image_size,
        "preprocessing": identity.preprocessing_id,
        "dtype": identity.dtype,
        "format_version": FORMAT_VERSION,
    }
    return f"{identity.backbone}-{content_hash(fields, 10)}"


def features_prefix(storage: Storage, dataset_name: str, identity: FeatureIdentity) -> str:
    """The folder of a dataset's feature set: ``features/<name>/<feature-key>``."""
    return storage.url("features", dataset_name, feature_key(identity))
