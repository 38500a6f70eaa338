"""Steering methods behind one interface, registered by name.

A method says whether the instruction is written in the prompt, whether its configuration is searched on val (or
borrowed from another method's search), which vector, if any, it adds, and how that vector is fitted when it is
learned rather than built (`SteeringMethod.fit`). Adding a method is one subclass of `SteeringMethod` decorated with
`@register`, in this module or a user's plugin module; the sweep, the report, the figures and the playground pick it
up from `METHODS` when they run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd
import torch

from .selection import DirectionKey, top_selected
from .vectors import direction_from_latents, random_latents, scale_direction

if TYPE_CHECKING:
    from .stages.steering import MethodFitter


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
    fitted: dict[tuple[str, str], tuple[torch.Tensor, int]] = field(default_factory=dict)
    """Fitted vectors and their number of latents per (task, method) for the methods that fit one
    (`SteeringMethod.fit`), filled by the steering stage after the search."""
    rankings: dict[str, pd.DataFrame] = field(default_factory=dict)
    """Per ranking method (`SteeringMethod.rank`), its own order of latents — rows like `selected` (task, layer,
    position, rank, latent, weight) — filled by the steering stage before the search."""

    def latents(self, task: str, layer: int, position: str, k: int) -> pd.DataFrame:
        """The top-k selected latents (rank, latent, weight) of a task at a layer and extraction position."""
        return top_selected(self.selected, task, layer, position, k)

    def ranked_latents(self, method: str, task: str, layer: int, position: str, k: int) -> pd.DataFrame:
        """The top-k latents of a ranking method's own order at a task, layer and extraction position."""
        if method not in self.rankings:
            raise ValueError(f"no latent ranking for {method}: the steering stage ranks before the search "
                             f"(steering.rank_methods)")
        return top_selected(self.rankings[method], task, layer, position, k)

    def fitted_vector(self, cond: Condition) -> tuple[torch.Tensor, int]:
        """The fitted vector of a fitting method for the condition's task, and its number of latents."""
        if (cond.task, cond.method) not in self.fitted:
            raise ValueError(f"no fitted vector for {cond.method} on {cond.task}: the steering stage fits it after "
                             f"the search (steering.fit_methods)")
        return self.fitted[(cond.task, cond.method)]

    def latent_vector(self, cond: Condition, draw: int = 0, random: bool = False,
                      top: pd.DataFrame | None = None) -> tuple[torch.Tensor, int]:
        """α‖h̄‖·unit(Σ_j w_j W_dec[j]) over the condition's top-k selected latents (or the rows of `top`) — or, with
        `random`, over as many random latents with the same weights (seeded by the condition and `draw`) — and the
        number of latents."""
        top = self.latents(cond.task, cond.layer, cond.position, cond.k) if top is None else top
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
    anchored_on: ClassVar[str | None] = None
    """For a tuned method: name of the tuned method whose chosen layer and extraction position its search keeps (it
    searches k and α there, after that method's search)."""
    random_draws: ClassVar[bool] = False
    """Prompts are assigned independent random draws round-robin (`n_random_draws`)."""

    @property
    def steers(self) -> bool:
        """True when the method adds a vector (its conditions carry a layer)."""
        return self.tuned or self.borrows is not None

    @property
    def fits(self) -> bool:
        """True when the method learns its vector after the search (it overrides `fit`)."""
        return type(self).fit is not SteeringMethod.fit

    @property
    def ranks(self) -> bool:
        """True when the method orders the latents itself before the search (it overrides `rank`)."""
        return type(self).rank is not SteeringMethod.rank

    def rank(self, fitter: MethodFitter, task: str, layer: int, position: str) -> pd.DataFrame:
        """This method's own order of latents at one task, layer and position (rows like `selected_latents.csv`:
        rank, latent, weight, and whatever the order was read from); only ranking methods override it, and read it
        back with `source.ranked_latents`."""
        raise TypeError(f"method {self.name!r} ranks nothing")

    def latents(self, source: VectorSource, cond: Condition, k: int) -> pd.DataFrame:
        """The top-k latents the method builds its vector from at `cond` (empty when it has none there)."""
        return source.latents(cond.task, cond.layer, cond.position, k)

    def fit(self, fitter: MethodFitter, cond: Condition) -> Fitted:
        """Learn the vector added at `cond` (the configuration this method is reported at) from the fitter's train and
        val targets; only methods that learn their vector override it, and their `vector` returns
        `source.fitted_vector(cond)`."""
        raise TypeError(f"method {self.name!r} fits nothing")

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        """The vector the condition adds and the number of latents behind it (0 when none)."""
        raise TypeError(f"method {self.name!r} adds no vector")


@dataclass(frozen=True)
class Fitted:
    """What a method's `fit` learned: the vector, its number of latents, the fitting history (one row per round) and,
    for a fit over latent weights, each latent's weight before and after (None otherwise)."""

    vector: torch.Tensor
    n_latents: int
    history: pd.DataFrame
    weights: pd.DataFrame | None = None


METHODS: dict[str, SteeringMethod] = {}
"""Every registered method by name, in registration order (the order of tables and figures)."""


def register(cls: type[SteeringMethod]) -> type[SteeringMethod]:
    """Class decorator: add one instance of a method to `METHODS` under its `name`. A module run again
    (`importlib.reload`) replaces its own method; another class of the same name is refused."""
    old = METHODS.get(cls.name)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a steering method named {cls.name!r} is already registered ({type(old).__module__})")
    if cls.borrows is not None and not METHODS.get(cls.borrows, SteeringMethod()).tuned:
        raise ValueError(f"{cls.name!r} borrows from {cls.borrows!r}, which is not a registered tuned method")
    if cls.anchored_on is not None:
        anchor = METHODS.get(cls.anchored_on)
        if not cls.tuned or anchor is None or not anchor.tuned or anchor.anchored_on is not None:
            raise ValueError(f"{cls.name!r} is anchored on {cls.anchored_on!r}: both must be tuned, and "
                             f"{cls.anchored_on!r} a registered method searched on its own (not anchored itself)")
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
class SaifOutput(SteeringMethod):
    """SAIF's candidates (its top latents by input activation) re-ranked by their effect on the output: how much
    adding each latent's decoder direction alone raises the likelihood of the model's own accepted prompted responses
    on train passages, with the instruction absent (`MethodFitter.output_ranking`); the top k by that effect are
    combined with SAIF's weights, as SAIF combines its own."""

    name = "saif_output"
    tuned = True
    uses_latents = True
    # Its candidates are SAIF's own at a layer and position, so it re-ranks them where SAIF chose to steer: the search
    # (and the output gradient behind the ranking) then covers one layer and position per task, not all of them.
    anchored_on = "saif"

    def rank(self, fitter: MethodFitter, task: str, layer: int, position: str) -> pd.DataFrame:
        return fitter.output_ranking(task, layer, position)

    def latents(self, source: VectorSource, cond: Condition, k: int) -> pd.DataFrame:
        return source.ranked_latents(self.name, cond.task, cond.layer, cond.position, k)

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        return source.latent_vector(cond, top=self.latents(source, cond, cond.k))


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


class CalibratedMethod(SteeringMethod):
    """A vector refined from the lender's SAIF vector by `calibration.calibrate` on the model's own accepted prompted
    responses (model and SAE frozen): over the k latent weights, or with `dense` over a free d_model vector."""

    borrows = "saif"
    dense: ClassVar[bool] = False
    """Refine a free d_model vector instead of the weights of SAIF's latents."""
    objective: ClassVar[str] = "nll"
    """What is fitted (`calibration.CalibrationConfig.objective`): the likelihood of the accepted prompted responses,
    or the KL from the prompted model's next-token distributions along them."""

    def fit(self, fitter: MethodFitter, cond: Condition) -> Fitted:
        from .calibration import initial_weights

        source = fitter.source
        top = source.latents(cond.task, cond.layer, cond.position, cond.k)
        latents = top["latent"].to_numpy()
        saif_vector, _ = source.latent_vector(cond)
        basis = source.saes[cond.layer].W_dec.detach().float().cpu()[torch.tensor(latents)]
        init = saif_vector.float() if self.dense else initial_weights(basis, top["weight"].to_numpy(),
                                                                      float(saif_vector.norm()))
        n_train, n_val = fitter.n_targets(cond.task)
        info = {"task": cond.task, "method": self.name, "layer": cond.layer, "k": cond.k, "alpha": cond.alpha,
                "position": cond.position, "n_train_targets": n_train, "n_val_targets": n_val}
        enough = fitter.enough_targets(cond.task)
        if enough:
            frames = fitter.calibrate(cond, init, None if self.dense else (latents, basis),
                                      desc=f"calibrate {self.name} {cond.task}", objective=self.objective)
            params = torch.tensor(frames["params"]["param"].to_numpy(), dtype=torch.float32)
            active = frames["params"]["active"].to_numpy()
            history = frames["history"].assign(**info, calibrated=True)
        else:  # too few accepted targets: SAIF's vector, and a history that says so
            params, active = init, np.ones(len(init), dtype=bool)
            history = pd.DataFrame([{"round": 0, "n_steps": 0, "train_nll": np.nan, "val_nll": np.nan,
                                     "n_active": len(init), "best": True, "converged": False, **info,
                                     "calibrated": False}])
        if self.dense:
            return Fitted(params, 0, history)
        weights = pd.DataFrame({**info, "rank": top["rank"].to_numpy(), "latent": latents,
                                "initial_weight": init.numpy(), "weight": params.numpy(), "pruned": ~active,
                                "calibrated": enough})
        return Fitted(params @ basis, int(active.sum()), history, weights)

    def vector(self, source: VectorSource, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
        return source.fitted_vector(cond)


@register
class SaifCalibrated(CalibratedMethod):
    """SAIF's k latents at SAIF's chosen configuration, their weights refined on train targets (model and SAE frozen)."""

    name = "saif_calibrated"
    uses_latents = True


@register
class SaifCalibratedKL(CalibratedMethod):
    """`saif_calibrated` with the other objective: the KL from the prompted model's next-token distributions along the
    accepted responses, rather than their likelihood (does the objective, not the optimiser, limit calibration?)."""

    name = "saif_calibrated_kl"
    uses_latents = True
    objective = "kl"


@register
class OptimizedDense(CalibratedMethod):
    """A free d_model vector at SAIF's layer, refined from SAIF's vector by the same optimiser: the upper bound of what
    restricting the vector to SAE decoder directions costs."""

    name = "optimized_dense"
    dense = True
