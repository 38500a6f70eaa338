"""Activations a stage reads from the model: residuals at chosen prompt tokens, SAE codes, and the per-layer
scales (mean residual norm, mean latent activation) that steering and ablation are measured against — each cached
on disk by content."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .io import atomic_path, cache_root, cached_json, content_hash
from .models import read_residual, read_residual_tokens

if TYPE_CHECKING:
    from .context import RunContext

READ_POSITIONS = {"last_prompt": "idx_last_prompt", "end_user": "idx_end_user", "last_instruction": "idx_last_instruction"}
"""The token a prompt is read at → the column of `data.build_prompts` that indexes it."""


def read_prompt_residuals(ctx: RunContext, prompts: pd.DataFrame, read_at: str) -> dict[int, torch.Tensor]:
    """Residual at `read_at` for every prompt at every SAE layer → `{layer: [n_prompts, d_model]}`, cached on disk
    by content.

    The key covers the model weights, every prompt's token ids and the read index, so reruns with the same
    data reuse the forward passes and any change recomputes them. Locally, prompts that share a prefix run it once:
    post-position prompts (and the negative) of one passage share the system turn and the passage; pre-position
    prompts share the system turn (grouping them by variant is slower: small groups cost more in calls than their
    shared instruction saves).
    """
    column = READ_POSITIONS[read_at]
    index = prompts[column].where(prompts[column] >= 0, prompts["idx_last_prompt"]).astype(int).tolist()
    token_ids = [list(ids) for ids in prompts["input_ids"]]
    groups = [("pre",) if pos == "pre" else ("post", p) for pos, p in zip(prompts["position"], prompts["passage_id"])]
    key = content_hash({"model": ctx.model_key, "ids": content_hash(token_ids), "index": index,
                        "shared_prefix": not ctx.remote})
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    root = cache_root() / "residuals"
    paths = {layer: root / f"{key}-L{layer}.safetensors" for layer in ctx.saes}

    def load(path):
        try:
            return load_file(str(path))["resid"]
        except (OSError, SafetensorError, KeyError):
            return None

    out = {layer: load(path) for layer, path in paths.items()}
    missing = [layer for layer, resid in out.items() if resid is None or resid.shape[0] != len(token_ids)]
    if missing:
        resid = read_residual(ctx.model, token_ids, missing, index, ctx.batch_size, ctx.remote, groups)
        for layer in missing:
            with atomic_path(paths[layer]) as tmp:
                save_file({"resid": resid[layer].contiguous()}, str(tmp))
            out[layer] = load(paths[layer])
    return out


@torch.inference_mode()
def encode(sae, resid: torch.Tensor, batch_size: int = 4096, latents: Sequence[int] | None = None) -> torch.Tensor:
    """SAE latent activations `[n, d_sae]` for residuals `[n, d_model]`; with `latents`, only their columns `[n, k]`
    (the full code then exists for one batch at a time, never for all rows)."""
    device = sae.W_dec.device
    cols = None if latents is None else torch.as_tensor(list(latents), dtype=torch.long, device=device)
    parts = []
    for i in range(0, len(resid), batch_size):
        acts = sae.encode(resid[i:i + batch_size].to(device, torch.float32))
        parts.append((acts if cols is None else acts[:, cols]).cpu())
    return torch.cat(parts)


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


def activation_mass(ctx: RunContext, token_ids: Sequence[Sequence[int]], layer: int) -> np.ndarray:
    """Mean activation of every latent of the layer's SAE over all prompt tokens (first token excluded) → `[d_sae]`,
    cached by the model, SAE, layer and prompts."""
    def compute() -> dict:
        resid = read_residual_tokens(ctx.model, token_ids, [layer], batch_size=ctx.batch_size, remote=ctx.remote,
                                     desc="activation mass")
        return {"mass": encode(ctx.saes[layer], resid[layer]).mean(0).tolist()}

    key = {"model": ctx.model_key, "sae": ctx.sae_keys[layer], "layer": layer,
           "ids": content_hash([list(ids) for ids in token_ids])}
    return np.asarray(cached_json("activation_mass", key, compute)["mass"], dtype=np.float32)
