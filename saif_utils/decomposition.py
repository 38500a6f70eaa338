"""How much of the diff-in-means direction an SAE's decoder directions carry, and whether SAIF's latents are the ones.

Diff-in-means (the mean residual with the instruction minus without) is the dense direction SAIF is compared with.
Two spans of k decoder directions are read against it: SAIF's top k latents (chosen by how they fire on the input),
and the k latents that reconstruct diff-in-means best (orthogonal matching pursuit over every decoder row). If the
second span carries most of diff-in-means at small k and the first does not, the SAE has the direction and SAIF picks
other latents; if neither does, the SAE's dictionary lacks it at that size.
"""
from __future__ import annotations

import numpy as np
import torch

SPAN_KS = (1, 5, 15, 30, 60)
"""Numbers of decoder directions whose span diff-in-means is projected on."""


def unit_rows(decoder: torch.Tensor) -> torch.Tensor:
    """The rows of `decoder` `[n, d]` scaled to unit norm (float32)."""
    decoder = decoder.detach().float().cpu()
    return decoder / decoder.norm(dim=1, keepdim=True)


def project_on_span(direction: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection of `direction` `[d]` on the span of the rows of `basis` `[k, d]` (least squares, so
    the rows need not be orthogonal)."""
    basis = basis.detach().double()
    coef = torch.linalg.lstsq(basis.T, direction.detach().double()[:, None]).solution
    return (basis.T @ coef)[:, 0].float()


def span_share(direction: torch.Tensor, basis: torch.Tensor) -> float:
    """Share of ‖direction‖² inside the span of the rows of `basis`: 1 when the rows can write it exactly, 0 when it
    is orthogonal to all of them."""
    projection = project_on_span(direction, basis).double()
    return float(projection.norm() ** 2 / direction.detach().double().norm() ** 2)


def best_latents(direction: torch.Tensor, decoder: torch.Tensor, k: int) -> np.ndarray:
    """The k latents whose unit decoder directions reconstruct `direction` best, by orthogonal matching pursuit
    (scikit-learn): each step adds the latent most aligned with what is left unexplained and refits them all."""
    from sklearn.linear_model import OrthogonalMatchingPursuit

    if not 1 <= k <= decoder.shape[0]:
        raise ValueError(f"k={k} must lie in 1 … {decoder.shape[0]} (the number of decoder rows)")
    dictionary = unit_rows(decoder).double().numpy().T  # [d, d_sae]: one column per latent
    target = direction.detach().double().cpu().numpy()
    fit = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False).fit(dictionary, target)
    return np.flatnonzero(fit.coef_)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()))
