"""Steering methods behind one interface, registered by name.

A method says whether the instruction is written in the prompt, whether its configuration is searched on val (or
borrowed from another method's search), and which vector, if any, it adds. Adding a method is one subclass of
`SteeringMethod` decorated with `@register`; the sweep, the report and the figures pick it up from `METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from .selection import DirectionKey, top_selected
from .vectors import direction_from_latents, random_latents, scale_direction


@dataclass(frozen=True)
class Condition:
    """One steering configuration; fields that do not apply to a method are None."""

    task: str
    method: str
    layer: int | None = None
    k: int | None = None
    alpha: float | None = None
    position: str | None = None


@dataclass(frozen=True)
class VectorSource:
    """What steering vectors are built from: the SAEs, the selected latents, the diff-in-means directions and the
    mean residual norm of each layer (α multiplies it)."""

    saes: dict[int, object]
    selected: pd.DataFrame
    directions: dict[DirectionKey, torch.Tensor]
    norms: dict[int, float]
    seed: int = 0
    calibrated: dict[tuple[str, str], tuple[torch.Tensor, int]] = field(default_factory=dict)
    """Refined vectors and their number of latents per (task, method) for the calibrating methods, filled by the
    steering stage after SAIF's search (`calibration`)."""

    def latents(self, task: str, layer: int, position: str, k: int) -> pd.DataFrame:
        """The top-k selected latents (rank, latent, weight) of a task at a layer and extraction position."""
        return top_selected(self.selected, task, layer, position, k)

    def calibrated_vector(self, cond: Condition) -> tuple[torch.Tensor, int]:
        """The refined vector of a calibrating method for the condition's task, and its number of latents."""
        if (cond.task, cond.method) not in self.calibrated:
            raise ValueError(f"no calibrated vector for {cond.method} on {cond.task}: the steering stage calibrates "
                             f"it after SAIF's search (steering.calibrate_vectors)")
        return self.calibrated[(cond.task, cond.method)]

    def latent_vector(self, cond: Condition, draw: int = 0, random: bool = False) -> tuple[torch.Tensor, int]:
        """α‖h̄‖·unit(Σ_j w_j W_dec[j]) over the condition's top-k latents — or, with `random`, over as many random
        latents with the same weights (seeded by the condition and `draw`) — and the number of latents."""
        top = self.latents(cond.task, cond.layer, cond.position, cond.k)
        if top.empty:
            raise ValueError(f"no latent with a positive score for {cond.task} at layer {cond.layer}, {cond.position}")
        latents, weights = top["latent"].to_numpy(), top["weight"].to_numpy()
        if random:
            seed = np.random.SeedSequence([self.seed, cond.layer, len(cond.task), sum(map(ord, cond.task)), draw])
            latents = random_latents(self.saes[cond.layer].cfg.d_sae, len(latents), latents, seed.generate_state(1)[0])
        direction = direction_from_latents(self.saes[cond.layer], latents.tolist(), weights.tolist())
        return scale_direction(direction, cond.alpha, self.norms[cond.layer]), len(latents)


class SteeringMethod:
    """One way to make the model follow an instruction; subclasses set the flags and, if they steer, `vector`."""

    name: ClassVar[str]
    instructed: ClassVar[bool] = False
    """The instruction is written in the prompt."""
    tuned: ClassVar[bool] = False
    """(layer, k, α, position) are searched on val for this method."""
    uses_latents: ClassVar[bool] = False
    """The vector is built from selected SAE latents, so k is a knob and a layer needs selected latents."""
    borrows: ClassVar[str | None] = None
    """Name of the tuned method whose chosen configuration this method is evaluated at."""
    random_draws: ClassVar[bool] = False
    """Prompts are assigned independent random draws round-robin (`n_random_draws`)."""
    calibrates: ClassVar[str | None] = None
    """What `calibration` refines, starting from the lender's SAIF vector: 'latent_weights' (the k weights over SAIF's
    latents) or 'dense' (a free d_model vector); None for methods that are not optimised."""

    @property
    def steers(self) -> bool:
        """True when the method adds a vector (its conditions carry a layer)."""
        return self.tuned or self.borrows is not None

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        """The vector the condition adds and the number of latents behind it (0 when none)."""
        raise TypeError(f"method {self.name!r} adds no vector")


METHODS: dict[str, SteeringMethod] = {}
"""Every registered method by name, in registration order (the order of tables and figures)."""


def register(cls: type[SteeringMethod]) -> type[SteeringMethod]:
    """Class decorator: add one instance of a method to `METHODS` under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"a steering method named {cls.name!r} is already registered")
    if cls.borrows is not None and not METHODS.get(cls.borrows, SteeringMethod()).tuned:
        raise ValueError(f"{cls.name!r} borrows from {cls.borrows!r}, which is not a registered tuned method")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> SteeringMethod:
    """The registered method called `name`, or an error naming the allowed ones."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}; allowed: {list(METHODS)}")
    return METHODS[name]


@register
class NoInstruction(SteeringMethod):
    """The content alone, no intervention: the floor."""

    name = "no_instruction"


@register
class Prompting(SteeringMethod):
    """The instruction written after the content: the ceiling steering is compared with."""

    name = "prompting"
    instructed = True


@register
class Saif(SteeringMethod):
    """The content alone plus α‖h̄‖·unit(Σ_j w_j W_dec[j]) over the top-k selected latents."""

    name = "saif"
    tuned = True
    uses_latents = True

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        return source.latent_vector(cond)


@register
class DiffInMeans(SteeringMethod):
    """The content alone plus the mean residual difference with − without the instruction, at the same norm."""

    name = "diff_in_means"
    tuned = True

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        direction = source.directions[DirectionKey(cond.task, cond.layer, cond.position)].float()
        return scale_direction(direction, cond.alpha, source.norms[cond.layer]), 0


@register
class RandomLatents(SteeringMethod):
    """The content alone plus k random latents with the selected weights, at SAIF's chosen configuration."""

    name = "random_latents"
    uses_latents = True
    borrows = "saif"
    random_draws = True

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        return source.latent_vector(cond, draw, random=True)


@register
class SaifPlusPrompt(SteeringMethod):
    """The instruction in the prompt and the SAIF vector at SAIF's chosen configuration."""

    name = "saif_plus_prompt"
    instructed = True
    uses_latents = True
    borrows = "saif"

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        return source.latent_vector(cond)


@register
class SaifCalibrated(SteeringMethod):
    """SAIF's k latents at SAIF's chosen configuration, their weights refined on train targets (model and SAE frozen)."""

    name = "saif_calibrated"
    uses_latents = True
    borrows = "saif"
    calibrates = "latent_weights"

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        return source.calibrated_vector(cond)


@register
class OptimizedDense(SteeringMethod):
    """A free d_model vector at SAIF's layer, refined from SAIF's vector by the same optimiser: the upper bound of what
    restricting the vector to SAE decoder directions costs."""

    name = "optimized_dense"
    borrows = "saif"
    calibrates = "dense"

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        return source.calibrated_vector(cond)
