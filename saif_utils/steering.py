"""Steering: add v = α · ‖h̄‖ · (Σ_j w_j W_dec[j]) / ‖Σ_j w_j W_dec[j]‖ to a layer's residual while generating.

α is a multiple of the mean residual norm ‖h̄‖ at that layer, so the same α means the same relative push at every
layer and on every model.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .io import cached_json, cached_json_items, content_hash
from .models import (check_model_layer, common_prefix_length, length_buckets, read_residual_tokens,
                     shared_prefix_batches)

Span = Literal["prompt", "generated", "both"]
SPANS = ("prompt", "generated", "both")


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


# ---------------------------------------------------------------- interventions on one layer's residual
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
class AblateLatents:
    """Subtract the decoded contribution Σ_j a_j(h) · W_dec[j] of `latents` from the residual (causal ablation):
    one latent set for every row, or one set per prompt (an empty set removes nothing), so that the conditions of an
    ablation share generation batches."""

    sae: object
    latents: tuple[int, ...] | tuple[tuple[int, ...], ...]
    sae_key: str
    """Identifies the SAE weights in cache keys (e.g. the hash in its training record)."""

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
        acts = self.sae.encode(resid.to(self.sae.W_dec.device, torch.float32))[..., idx]
        if self.per_row:  # zero the latents a row does not remove: adding exact zeros leaves that row unchanged
            keep = torch.tensor([[j in row for j in union] for row in map(set, self.latents)], dtype=acts.dtype,
                                device=acts.device)
            acts = acts * keep[:, None, :]
        return -(acts @ self.sae.W_dec[idx].float()).to(resid.device, resid.dtype)

    def rows(self, rows: Sequence[int]) -> AblateLatents:
        """The edit for a batch holding prompts `rows` (the same edit when the latent set is shared)."""
        return AblateLatents(self.sae, tuple(self.latents[i] for i in rows), self.sae_key) if self.per_row else self

    def fingerprint(self) -> dict:
        """Cache identity: the SAE and the latent set."""
        if self.per_row:
            raise ValueError("a per-row ablation has no single cache identity; key each prompt by its own set")
        return {"ablate": self.sae_key, "latents": sorted(map(int, self.latents))}


Intervention = AddVector | AblateLatents


@torch.inference_mode()
def generate_steered(model, token_ids: Sequence[Sequence[int]], layer: int, edit: Intervention | torch.Tensor | None,
                     max_new_tokens: int, span: Span = "both", batch_size: int = 8, remote: bool = False,
                     desc: str = "generating", min_new_tokens: int | None = None) -> list[list[int]]:
    """Greedy generation of up to `max_new_tokens` per prompt (stopping at end-of-turn, never before
    `min_new_tokens` — benchmarks use it to fix the amount of work) with `edit` applied to the
    output of decoder block `layer` at the prompt positions, at every generated token, or both. A bare tensor means
    `AddVector(tensor)`. Returns the new token ids per prompt, without the end-of-turn token.

    nnsight's `tracer.iter[:]` visits the forward pass of each step: step 0 is the whole (left-padded) prompt,
    each later step one new token under the KV cache — so "generated" really reaches every new token. The loop is
    open-ended because a batch whose rows all finish stops early; the result is read in a second invoke, which
    runs after the loop however it ends. (A hand-written loop of one nnsight trace per step that drops finished rows
    from the batch and its cache gave the same tokens but measured 15 % slower on 64 sweep prompts: a decode step
    costs ≈ 55 ms + 3.9 ms per row here, and rows finish late.)
    """
    if span not in SPANS:
        raise ValueError(f"span={span!r}; allowed: {list(SPANS)}")
    check_model_layer(model, layer)
    if isinstance(edit, torch.Tensor):
        edit = AddVector(edit)
    stop_ids = {model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
    out: list[list[int] | None] = [None] * len(token_ids)
    batches = list(length_buckets(token_ids, batch_size, model.tokenizer.pad_token_id))
    for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 3):
        batch_edit = None if edit is None else edit.rows(batch.rows)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with model.generate(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                pad_token_id=model.tokenizer.pad_token_id, remote=remote) as tracer:
                with tracer.invoke({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}):
                    if batch_edit is not None and span == "prompt":
                        resid = model.model.layers[layer].output  # the first forward: the whole prompt
                        resid[:] += batch_edit.delta(resid)
                    elif batch_edit is not None:
                        # Every step must touch the module: a step that waits on nothing would spin forever.
                        for step in tracer.iter[:]:
                            resid = model.model.layers[layer].output
                            if step > 0 or span == "both":
                                resid[:] += batch_edit.delta(resid)
                with tracer.invoke():
                    result = tracer.result.save()
        width = batch.input_ids.shape[1]
        for r, i in enumerate(batch.rows):
            new = result[r, width:].tolist()
            out[i] = new[: next((j for j, t in enumerate(new) if t in stop_ids), len(new))]
    return out


def cached_generate(model, model_key: str, token_ids: Sequence[Sequence[int]], layer: int | None,
                    edit: Intervention | Sequence[Intervention | None] | None, max_new_tokens: int, span: Span = "both",
                    batch_size: int = 8, remote: bool = False, desc: str = "generating") -> list[list[int]]:
    """`generate_steered` with one cache entry per prompt, keyed by (model, layer, intervention, span, prompt ids,
    decoding): a rerun after a crash, or with one more α, generates only what is new. Entries are written atomically
    and checked on read (a truncated or corrupt entry is regenerated).

    `edit` may also be a list with one edit (or None) per prompt: the missing prompts of every condition at a layer
    are then generated together in full batches, each row with its own vector or latent set (None adds exact zeros,
    which leaves the residual bit-identical)."""
    per_prompt, edits = _per_prompt(edit, len(token_ids))

    def key(ids: Sequence[int], row_edit: Intervention | None) -> dict:
        edit_key = None if row_edit is None else {"layer": layer, "span": span, **row_edit.fingerprint()}
        return {"model": model_key, "max_new_tokens": max_new_tokens, "decoding": "greedy", "edit": edit_key,
                "prompt": list(ids)}

    def parse(entry: dict) -> list[int] | None:
        ids = entry["ids"]
        return ids if isinstance(ids, list) and len(ids) <= max_new_tokens else None

    def compute(missing: list[int]) -> list[dict]:
        batch_edit = _stack_edits([edits[i] for i in missing]) if per_prompt else edit
        fresh = generate_steered(model, [token_ids[i] for i in missing], 0 if layer is None else layer, batch_edit,
                                 max_new_tokens, span, batch_size, remote, desc)
        return [{"ids": ids} for ids in fresh]

    return cached_json_items("generations", [key(ids, e) for ids, e in zip(token_ids, edits)], compute, parse)


def _per_prompt(edit: Intervention | Sequence[Intervention | None] | None, n: int
                ) -> tuple[bool, list[Intervention | None]]:
    """`(per_prompt, one edit per prompt)` for a shared edit or a list with one edit per prompt."""
    per_prompt = isinstance(edit, (list, tuple))
    edits = list(edit) if per_prompt else [edit] * n
    if len(edits) != n:
        raise ValueError(f"{len(edits)} edits for {n} prompts; pass one per prompt")
    return per_prompt, edits


def _stack_edits(edits: Sequence[Intervention | None]) -> Intervention | None:
    """One per-row edit for prompts with their own edits (None → no change): `AddVector` rows (zeros where None) or
    `AblateLatents` rows of one SAE (an empty set where None); None when no row is edited."""
    present = [e for e in edits if e is not None]
    if not present:
        return None
    if all(isinstance(e, AddVector) for e in present):
        zeros = torch.zeros_like(present[0].vector.float())
        return AddVector(torch.stack([zeros if e is None else e.vector.float() for e in edits]))
    sae = getattr(present[0], "sae", None)
    if all(isinstance(e, AblateLatents) and not e.per_row and e.sae is sae for e in present):
        return AblateLatents(sae, tuple(() if e is None else tuple(map(int, e.latents)) for e in edits),
                             present[0].sae_key)
    raise TypeError("per-prompt edits must all be AddVector, or all AblateLatents of one SAE (None: no edit)")


# ---------------------------------------------------------------- scales, baselines and likelihoods
def mean_residual_norm(model, token_ids: Sequence[Sequence[int]], layers: Sequence[int], batch_size: int = 16,
                       remote: bool = False, model_key: str | None = None) -> dict[int, float]:
    """Mean L2 norm of the residual at each layer over every real token but the first (the attention sink);
    cached when `model_key` names the weights."""
    def compute() -> dict:
        resid = read_residual_tokens(model, token_ids, layers, batch_size=batch_size, remote=remote,
                                     desc="residual norms")
        return {"norms": {str(layer): float(acts.float().norm(dim=-1).mean()) for layer, acts in resid.items()}}

    key = None if model_key is None else {"model": model_key, "ids": content_hash([list(ids) for ids in token_ids]),
                                          "layers": sorted(layers)}
    entry = cached_json("residual_norms", key, compute)
    return {layer: entry["norms"][str(layer)] for layer in layers}


def random_latents(d_sae: int, k: int, exclude: Sequence[int], seed: int) -> np.ndarray:
    """`k` distinct latents drawn uniformly from those not in `exclude` (seeded)."""
    pool = np.setdiff1d(np.arange(d_sae), np.asarray(exclude, dtype=int))
    if k > len(pool):
        raise ValueError(f"k={k} random latents requested but only {len(pool)} are available (d_sae={d_sae})")
    return np.sort(np.random.default_rng(seed).choice(pool, size=k, replace=False))


def mass_matched_latents(mass: np.ndarray, selected: Sequence[int], seed: int, window: int = 10) -> np.ndarray:
    """For each selected latent, a different non-selected latent drawn among the `window` nearest to it in
    activation mass (`mass[j]`, e.g. latent j's mean activation): a random set with matched total mass."""
    selected = [int(j) for j in selected]
    pool = np.setdiff1d(np.arange(len(mass)), selected)
    pool = pool[np.argsort(mass[pool], kind="stable")]
    rng = np.random.default_rng(seed)
    taken: set[int] = set()
    out = []
    for j in selected:
        centre = int(np.searchsorted(mass[pool], mass[j]))
        lo = max(0, centre - window)
        candidates = [int(c) for c in pool[lo:centre + window] if int(c) not in taken]
        pick = int(rng.choice(candidates))
        taken.add(pick)
        out.append(pick)
    return np.asarray(out)


@torch.inference_mode()
def continuation_logprob(model, prefix_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]],
                         layer: int | None = None, edit: Intervention | None = None, batch_size: int = 8,
                         remote: bool = False) -> np.ndarray:
    """Mean log-probability per token of each continuation given its prefix (teacher-forced), optionally with
    `edit` (shared, or per row as `cached_logprob` stacks it) applied at every position of decoder block `layer`.

    Without an edit, the tokens every prefix shares (notebook 05 scores all responses after one empty user turn) run
    once and their KV cache serves every batch."""
    if len(prefix_ids) != len(cont_ids):
        raise ValueError(f"{len(prefix_ids)} prefixes but {len(cont_ids)} continuations")
    if edit is not None:
        check_model_layer(model, layer)
    full = [list(p) + list(c) for p, c in zip(prefix_ids, cont_ids)]
    out = np.full(len(full), np.nan)
    # The last prefix token stays outside the shared part: its logits predict the first continuation token.
    n_shared = min(common_prefix_length(prefix_ids), *(len(p) - 1 for p in prefix_ids)) if full else 0
    if edit is None and not remote and n_shared > 0:
        batches = ((rows, ids, {"attention_mask": mask, "cache": cache}, n_shared)
                   for rows, ids, mask, cache in shared_prefix_batches(model, full, n_shared, batch_size))
    else:
        batches = ((b.rows, b.input_ids, {"attention_mask": b.attention_mask}, None)
                   for b in length_buckets(full, batch_size, model.tokenizer.pad_token_id))
    for rows, ids, inputs, shared in batches:
        with model.trace(ids, **inputs, remote=remote):
            if edit is not None:
                resid = model.model.layers[layer].output
                resid[:] += edit.rows(rows).delta(resid)
            logits = model.lm_head.output
            targets = ids[:, 1:, None].to(logits.device)
            token_lp = logits[:, :-1].float().log_softmax(-1).gather(-1, targets)[..., 0].cpu().save()
        for r, i in enumerate(rows):
            n_cont = len(cont_ids[i])
            # column of the logit predicting the first continuation token: right-padded suffixes start after the
            # shared prefix, left-padded rows end at the last column
            first = len(prefix_ids[i]) - 1 - shared if shared is not None else ids.shape[1] - 1 - n_cont
            if n_cont:
                out[i] = float(token_lp[r, first:first + n_cont].mean())
    return out


def cached_logprob(model, model_key: str, prefix_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]],
                   layer: int | None = None, edit: Intervention | Sequence[Intervention | None] | None = None,
                   batch_size: int = 8, remote: bool = False) -> np.ndarray:
    """`continuation_logprob` with one cache entry per (model, intervention, prefix, continuation): warm reruns of
    notebooks 04 and 05 score fluency and likelihood without a forward pass. `edit` may be one per prompt, as in
    `cached_generate`, so several conditions share batches."""
    per_prompt, edits = _per_prompt(edit, len(prefix_ids))
    keys = [{"model": model_key, "edit": None if e is None else {"layer": layer, **e.fingerprint()},
             "prefix": list(p), "cont": list(c)} for p, c, e in zip(prefix_ids, cont_ids, edits)]

    def compute(missing: list[int]) -> list[dict]:
        batch_edit = _stack_edits([edits[i] for i in missing]) if per_prompt else edit
        fresh = continuation_logprob(model, [prefix_ids[i] for i in missing], [cont_ids[i] for i in missing],
                                     layer, batch_edit, batch_size, remote)
        return [{"logprob": None if np.isnan(v) else float(v)} for v in fresh]

    # An empty continuation has no log-probability (stored as null); a 1-tuple keeps it apart from a missing entry.
    values = cached_json_items("logprobs", keys, compute, lambda entry: (entry["logprob"],))
    return np.array([np.nan if v is None else v for (v,) in values], dtype=float)
