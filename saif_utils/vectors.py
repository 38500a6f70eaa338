"""Steering vectors v = α · ‖h̄‖ · unit(Σ_j w_j W_dec[j]), and the random latent sets that control for them.

α is a multiple of the mean residual norm ‖h̄‖ at the layer, so the same α means the same relative push at every
layer and on every model.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .stats import round_significant


def direction_from_latents(sae, latents: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
    """Unit vector along Σ_j w_j · W_dec[j] over the selected latents `[d_model]`."""
    if len(latents) == 0:
        raise ValueError("direction_from_latents: no latents selected (k must be ≥ 1)")
    if len(latents) != len(weights):
        raise ValueError(f"{len(latents)} latents but {len(weights)} weights")
    d_sae = sae.cfg.d_sae
    bad = [j for j in latents if not 0 <= int(j) < d_sae]
    if bad:
        raise ValueError(f"latent indices {bad} are outside 0 … {d_sae - 1} (d_sae={d_sae})")
    W_dec = sae.W_dec.detach().float().cpu()  # steering vectors live on the CPU; `delta` moves them per batch
    vec = (torch.as_tensor(weights, dtype=torch.float32)[:, None] * W_dec[torch.as_tensor(latents)]).sum(0)
    norm = vec.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the weighted decoder directions cancel out (zero norm); check the weights")
    return vec / norm


def scale_direction(direction: torch.Tensor, alpha: float, mean_norm: float) -> torch.Tensor:
    """The steering vector: a unit `direction` scaled to `alpha` × the layer's mean residual norm."""
    if not torch.isfinite(torch.tensor(float(alpha))):
        raise ValueError(f"alpha={alpha!r} must be a finite number")
    return direction / direction.norm() * float(alpha) * float(mean_norm)


def random_latents(d_sae: int, k: int, exclude: Sequence[int], seed: int) -> np.ndarray:
    """`k` distinct latents drawn uniformly from those not in `exclude` (seeded)."""
    pool = np.setdiff1d(np.arange(d_sae), np.asarray(exclude, dtype=int))
    if k > len(pool):
        raise ValueError(f"k={k} random latents requested but only {len(pool)} are available (d_sae={d_sae})")
    return np.sort(np.random.default_rng(seed).choice(pool, size=k, replace=False))


MASS_DIGITS = 2
"""Significant digits of the activation mass the matching reads. Masses that differ in their last bits between two
CPUs then sort, and fall into windows, alike (ties by latent index); a window of 2 × 10 neighbours already spans
several per cent of mass, so two digits lose no matching that the window keeps."""


def mass_matched_latents(mass: np.ndarray, selected: Sequence[int], seed: int, window: int = 10) -> np.ndarray:
    """For each selected latent, a different non-selected latent drawn among the `window` nearest to it in
    activation mass (`mass[j]`, e.g. latent j's mean activation, rounded to `MASS_DIGITS`): a random set with matched
    total mass."""
    selected = [int(j) for j in selected]
    mass = round_significant(mass, MASS_DIGITS)
    pool = np.setdiff1d(np.arange(len(mass)), selected)
    pool = pool[np.argsort(mass[pool], kind="stable")]
    rng = np.random.default_rng(seed)
    taken: set[int] = set()
    out = []
    for j in selected:
        centre = int(np.searchsorted(mass[pool], mass[j]))
        lo = max(0, centre - window)
        # in index order: which neighbours are candidates decides the draw, not how near each one is
        candidates = sorted(int(c) for c in pool[lo:centre + window] if int(c) not in taken)
        pick = int(rng.choice(candidates))
        taken.add(pick)
        out.append(pick)
    return np.asarray(out)
