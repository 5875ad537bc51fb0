"""The settings of an RP2 attack (Eykholt et al., CVPR 2018), with a default printable palette."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DEFAULT_PALETTE", "RP2Params"]

DEFAULT_PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 0.0),
    (1.0, 1.0, 1.0),
    (0.5, 0.5, 0.5),
    (0.8, 0.1, 0.1),
    (0.5, 0.05, 0.05),
    (0.1, 0.6, 0.2),
    (0.1, 0.2, 0.7),
    (0.95, 0.85, 0.1),
)
"""A small illustrative printable palette, RGB in [0, 1]: black, white, grey, red, dark
red, green, blue, yellow. Not measured: Sharif et al. (2016) and RP2 print a colour chart
and photograph it (RP2 uses 30 such triplets); pass a measured palette for real prints."""


class RP2Params(BaseModel):
    """Settings of :func:`train_rp2` (unknown keys rejected; ``lambda`` may be written
    ``lambda`` or ``lam``).

    Attributes:
        target: target class ``y*`` (>= 0); 5 = GTSRB "Speed limit (80km/h)", RP2's
            GTSRB target.
        lam: ``lambda``, weight of ``||M . delta||_p`` (>= 0); 0.001 in RP2's GTSRB run.
        p: norm of the penalty, 1 or 2 (L2 in RP2's GTSRB run).
        steps: Adam steps, each over every victim x ``eot_samples`` transforms.
        lr: Adam learning rate, pixel units of [0, 1] per step (RP2's GTSRB run used
            0.25 on an unbounded noise; 0.1 here, as ``delta`` is clipped to [-1, 1]).
        rotation: transforms rotate by an angle uniform in [-rotation, rotation]
            degrees (0-180).
        scale: ``(min, max)`` zoom factor, uniform; > 1 enlarges the sign.
        brightness: ``(min, max)`` factor multiplying every pixel, uniform.
        translate: shift uniform in [-translate, translate] x image side, per axis,
            in [0, 0.5).
        nps_weight: weight of the non-printability score (0 switches it off).
        palette: printable colours, RGB triplets in [0, 1] (:data:`DEFAULT_PALETTE`).
        eot_samples: transformed copies of each victim per step (1-256).
        sticker_fill: ``None``: additive perturbation ``x + M . delta`` (the
            equation); a grey level in [0, 1]: the masked pixels are replaced by
            ``fill + delta`` (RP2 code's inverse mask, 0.5 there).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    target: int = Field(5, ge=0, description="target class y*")
    lam: float = Field(0.001, ge=0, alias="lambda", description="weight of ||M delta||_p")
    p: Literal[1, 2] = Field(2, description="norm of the penalty")
    steps: int = Field(1000, ge=1, le=1_000_000)
    lr: float = Field(0.1, gt=0, le=10, description="Adam learning rate, pixel units")
    rotation: float = Field(10.0, ge=0, le=180, description="max rotation, degrees")
    scale: tuple[float, float] = Field((0.9, 1.1), description="(min, max) zoom")
    brightness: tuple[float, float] = Field((0.8, 1.2), description="(min, max) brightness factor")
    translate: float = Field(0.05, ge=0, lt=0.5, description="max shift, fraction of the side")
    nps_weight: float = Field(0.0, ge=0, description="weight of the non-printability score")
    palette: tuple[tuple[float, float, float], ...] = Field(DEFAULT_PALETTE, min_length=1)
    eot_samples: int = Field(4, ge=1, le=256, description="transformed copies per victim per step")
    sticker_fill: float | None = Field(None, ge=0, le=1, description="null: additive; else grey under the sticker")

    @field_validator("palette")
    @classmethod
    def _palette_in_range(cls, v: tuple[tuple[float, float, float], ...]) -> tuple[tuple[float, float, float], ...]:
        bad = [c for c in v if not all(0.0 <= float(x) <= 1.0 for x in c)]
        if bad:
            raise ValueError(f"palette colours must be RGB triplets in [0, 1], got {bad[0]}")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> RP2Params:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 10:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 10, got {self.scale}")
        lo, hi = self.brightness
        if not 0 <= lo <= hi <= 10:
            raise ValueError(f"brightness must be (min, max) with 0 <= min <= max <= 10, got {self.brightness}")
        return self
