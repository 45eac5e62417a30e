"""The ``ablation`` config section: which variants (dotted overrides of the ``model``, ``loss``
and ``train`` sections) and seeds ``python -m flows.ablation`` runs (:mod:`tasks.ablation`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from lesa_common import StrictModel

OVERRIDABLE_SECTIONS = ("model", "loss", "train")
VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9 =._+-]*$"


class AblationVariant(StrictModel):
    """One row of the ablation: a name and the config values it changes."""

    name: str = Field(pattern=VARIANT_NAME, max_length=60)
    set: dict[str, Any] = Field(default_factory=dict)
    """Dotted keys under ``model.``, ``loss.`` or ``train.`` and their values."""

    @field_validator("set")
    @classmethod
    def _only_training_sections(cls, value: dict[str, Any]) -> dict[str, Any]:
        outside = [key for key in value if key.split(".", 1)[0] not in OVERRIDABLE_SECTIONS]
        if outside:
            raise ValueError(
                f"ablation variants may only change {', '.join(OVERRIDABLE_SECTIONS)}; "
                f"got {outside}"
            )
        return value


def paper_grid() -> list[AblationVariant]:
    """The paper's ablation (Table 4 / Fig. 5) plus the release's normalisation and selection."""
    terms = {"loss.div": 0.0, "loss.rel": 0.0, "loss.dist": 0.0}
    return [
        AblationVariant(name="LESA"),
        AblationVariant(name="no div", set={"loss.div": 0.0}),
        AblationVariant(name="no rel", set={"loss.rel": 0.0}),
        AblationVariant(name="no dist", set={"loss.dist": 0.0}),
        AblationVariant(name="rank only", set=terms),
        *(AblationVariant(name=f"M={m}", set={"model.num_modules": m}) for m in (1, 3, 5, 10)),
        AblationVariant(name="release normalisation", set={"loss.normalisation": "release"}),
        AblationVariant(name="select mAP", set={"train.select": "mAP"}),
        AblationVariant(name="select mix", set={"train.select": "mix", "train.holdout_share": 0.2}),
    ]


class AblationConfig(StrictModel):
    """The grid ``python -m flows.ablation`` runs: variants x seeds (every cell one run)."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    variants: list[AblationVariant] = Field(default_factory=paper_grid, min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, value: list[AblationVariant]) -> list[AblationVariant]:
        names = [variant.name for variant in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"ablation variant names must be unique; repeated: {repeated}")
        return value
