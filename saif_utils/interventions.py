"""Edits of one layer's residual stream: add a steering vector, or remove latents' decoded contribution.

An edit computes `delta(resid)` — what to add to a residual `[B, S, d]` — so one generation or scoring loop serves
every intervention. An edit may carry one setting per prompt, which lets conditions with different vectors or latent
sets share batches; `rows` cuts it to the prompts of one batch and `fingerprint` names it in cache keys.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Span = Literal["prompt", "generated", "both"]
SPANS = ("prompt", "generated", "both")
"""Where an edit acts while generating: the prompt's positions, every generated token, or both."""


@dataclass(frozen=True, eq=False)
class AddVector:
    """Add a fixed vector `[d]` to the residual (steering), or one vector per prompt `[n_prompts, d]`, so that
    conditions with different vectors at one layer share generation batches."""

    vector: torch.Tensor

    def delta(self, resid: torch.Tensor) -> torch.Tensor:
        """What to add to a residual `[B, S, d]`."""
        vector = self.vector.to(resid.device, resid.dtype)
        return vector[:, None, :] if vector.ndim == 2 else vector

    def rows(self, rows: Sequence[int]) -> AddVector:
        """The edit for a batch holding prompts `rows` (the same edit when the vector is shared)."""
        return AddVector(self.vector[list(rows)]) if self.vector.ndim == 2 else self

    def fingerprint(self) -> dict:
        """Cache identity: the vector's exact bytes."""
        return {"add": hashlib.sha256(self.vector.float().contiguous().numpy().tobytes()).hexdigest()[:16]}


@dataclass(frozen=True, eq=False)
class SAEWeights:
    """An sae-lens SAE's inference maths over plain tensors. Edits carry this instead of the module, so that on NDIF
    the SAE's weights travel with the trace by value and its encoder runs on the server like any tensor code."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    architecture: Literal["standard", "topk", "jumprelu"]
    k: int | None = None
    threshold: torch.Tensor | None = None
    subtract_b_dec: bool = True
    """sae-lens's `apply_b_dec_to_input`: the decoder bias is subtracted before encoding."""
    decoder_norms: torch.Tensor | None = None
    """Decoder row norms `[d_sae]` for TopK SAEs trained with `rescale_acts_by_decoder_norm` (pre-activations are
    multiplied by them, activations divided by them again when decoded); None otherwise. Computed once here rather
    than at every generation step."""

    @classmethod
    def of(cls, sae) -> SAEWeights:
        """The weights of an sae-lens SAE (float32 copies); fails for architectures or normalisations it cannot mirror."""
        if isinstance(sae, SAEWeights):
            return sae
        arch = sae.cfg.architecture()
        if arch not in ("standard", "topk", "jumprelu"):
            raise ValueError(f"SAE architecture {arch!r} is not supported by SAEWeights (standard, topk, jumprelu)")
        if sae.cfg.normalize_activations not in ("none", "expected_average_only_in") or \
                getattr(sae.cfg, "reshape_activations", "none") != "none":
            raise ValueError(f"SAE normalisation {sae.cfg.normalize_activations!r} / reshape "
                             f"{sae.cfg.reshape_activations!r} is not supported by SAEWeights; fold it into the weights")

        def weight(t):  # float32 views of the (frozen) module weights: no copy for an fp32 SAE
            return t.detach().float()

        W_dec = weight(sae.W_dec)
        rescale = arch == "topk" and bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
        return cls(weight(sae.W_enc), weight(sae.b_enc), W_dec, weight(sae.b_dec), arch,
                   k=sae.cfg.k if arch == "topk" else None,
                   threshold=weight(sae.threshold) if arch == "jumprelu" else None,
                   subtract_b_dec=bool(sae.cfg.apply_b_dec_to_input),
                   decoder_norms=W_dec.norm(dim=-1) if rescale else None)

    def _pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations `[..., d_sae]` (float32; top-k SAEs' decoder-norm rescaling included)."""
        x = x.float()
        pre = (x - self.b_dec.to(x.device) if self.subtract_b_dec else x) @ self.W_enc.to(x.device) + self.b_enc.to(x.device)
        if self.architecture == "topk" and self.decoder_norms is not None:
            pre = pre * self.decoder_norms.to(x.device)
        return pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations `[..., d_sae]` of residuals `x` `[..., d_in]` (float32), as sae-lens's `encode`."""
        pre = self._pre_activations(x)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold.to(x.device))
        return pre.relu()

    def encode_columns(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """`encode(x)[..., latents]` `[..., len(latents)]`, equal value for value, without building the full code (an
        ablation batch of 135 prompts × 100 tokens × 4,608 latents: 250 MB, of which it reads a few dozen columns)."""
        pre = self._pre_activations(x)
        cols = latents.to(pre.device)
        picked = pre[..., cols]
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1, sorted=False).indices
            return torch.where((top[..., None, :] == cols[:, None]).any(-1), picked.relu(), 0.0)
        if self.architecture == "jumprelu":
            return picked.relu() * (picked > self.threshold.to(x.device)[cols])
        return picked.relu()

    def decode_latents(self, acts: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Σ_j acts[..., j] · W_dec[latents[j]] (no decoder bias): what the listed latents add to the reconstruction."""
        latents = latents.to(acts.device)
        if self.decoder_norms is not None:
            acts = acts / self.decoder_norms.to(acts.device)[latents]
        return acts @ self.W_dec.to(acts.device)[latents]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The SAE's reconstruction of `x` (sae-lens `forward`, float32)."""
        acts = self.encode(x)
        return self.decode_latents(acts, torch.arange(acts.shape[-1])) + self.b_dec.to(acts.device)


@dataclass(frozen=True, eq=False)
class AblateLatents:
    """Subtract the decoded contribution Σ_j a_j(h) · W_dec[j] of `latents` from the residual (causal ablation):
    one latent set for every row, or one set per prompt (an empty set removes nothing), so that the conditions of an
    ablation share generation batches."""

    sae: SAEWeights
    """An sae-lens SAE is converted on construction (`SAEWeights.of`)."""
    latents: tuple[int, ...] | tuple[tuple[int, ...], ...]
    sae_key: str
    """Identifies the SAE weights in cache keys (e.g. the hash in its training record)."""

    def __post_init__(self):
        object.__setattr__(self, "sae", SAEWeights.of(self.sae))

    @property
    def per_row(self) -> bool:
        """True when every prompt has its own latent set."""
        return bool(self.latents) and isinstance(self.latents[0], tuple)

    def delta(self, resid: torch.Tensor) -> torch.Tensor:
        """Minus the latents' reconstruction of `resid` `[B, S, d]`."""
        row_sets = self.latents if self.per_row else (self.latents,)
        union = sorted({int(j) for latents in row_sets for j in latents})
        if not union:
            return torch.zeros_like(resid)
        idx = torch.as_tensor(union)
        acts = self.sae.encode_columns(resid, idx)
        if self.per_row:  # zero the latents a row does not remove: adding exact zeros leaves that row unchanged
            keep = torch.tensor([[j in row for j in union] for row in map(set, self.latents)], dtype=acts.dtype,
                                device=acts.device)
            acts = acts * keep[:, None, :]
        return -self.sae.decode_latents(acts, idx).to(resid.dtype)

    def rows(self, rows: Sequence[int]) -> AblateLatents:
        """The edit for a batch holding prompts `rows` (the same edit when the latent set is shared)."""
        return AblateLatents(self.sae, tuple(self.latents[i] for i in rows), self.sae_key) if self.per_row else self

    def fingerprint(self) -> dict:
        """Cache identity: the SAE and the latent set."""
        if self.per_row:
            raise ValueError("a per-row ablation has no single cache identity; key each prompt by its own set")
        return {"ablate": self.sae_key, "latents": sorted(map(int, self.latents))}


Intervention = AddVector | AblateLatents


def per_prompt_edits(edit: Intervention | Sequence[Intervention | None] | None, n: int
                ) -> tuple[bool, list[Intervention | None]]:
    """`(per_prompt, one edit per prompt)` for a shared edit or a list with one edit per prompt."""
    per_prompt = isinstance(edit, (list, tuple))
    edits = list(edit) if per_prompt else [edit] * n
    if len(edits) != n:
        raise ValueError(f"{len(edits)} edits for {n} prompts; pass one per prompt")
    return per_prompt, edits


def stack_edits(edits: Sequence[Intervention | None]) -> Intervention | None:
    """One per-row edit for prompts with their own edits (None → no change): `AddVector` rows (zeros where None) or
    `AblateLatents` rows of one SAE (an empty set where None); None when no row is edited."""
    present = [e for e in edits if e is not None]
    if not present:
        return None
    if all(isinstance(e, AddVector) for e in present):
        zeros = torch.zeros_like(present[0].vector.float())
        return AddVector(torch.stack([zeros if e is None else e.vector.float() for e in edits]))
    key = getattr(present[0], "sae_key", None)
    if all(isinstance(e, AblateLatents) and not e.per_row and e.sae_key == key for e in present):
        return AblateLatents(present[0].sae, tuple(() if e is None else tuple(map(int, e.latents)) for e in edits), key)
    raise TypeError("per-prompt edits must all be AddVector, or all AblateLatents of one SAE (None: no edit)")
