"""Steering: add v = α · ‖h̄‖ · (Σ_j w_j W_dec[j]) / ‖Σ_j w_j W_dec[j]‖ to a layer's residual while generating.

α is a multiple of the mean residual norm ‖h̄‖ at that layer, so the same α means the same relative push at every
layer and on every model.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .models import length_buckets

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
    W_dec = sae.W_dec.detach().float()
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


@torch.inference_mode()
def generate_steered(model, token_ids: Sequence[Sequence[int]], layer: int, vector: torch.Tensor | None,
                     max_new_tokens: int, span: Span = "both", batch_size: int = 8,
                     remote: bool = False) -> list[list[int]]:
    """Greedy generation of exactly `max_new_tokens` per prompt, adding `vector` to the output of decoder block
    `layer` at the prompt positions, at every generated token, or both. Returns the new token ids per prompt.

    nnsight's `tracer.iter[:N]` visits the forward pass of each step: step 0 is the whole (left-padded) prompt,
    each later step one new token under the KV cache — so "generated" really reaches every new token.
    """
    if span not in SPANS:
        raise ValueError(f"span={span!r}; allowed: {list(SPANS)}")
    n_layers = len(model.model.layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has {n_layers} layers (0 … {n_layers - 1})")
    steps = range(max_new_tokens)
    active = {0} if span == "prompt" else set(steps[1:]) if span == "generated" else set(steps)
    out: list[list[int] | None] = [None] * len(token_ids)
    for batch in length_buckets(token_ids, batch_size, model.tokenizer.pad_token_id):
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with model.generate(inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=model.tokenizer.pad_token_id, remote=remote) as tracer:
            if vector is not None:
                for step in tracer.iter[:max_new_tokens]:
                    if step in active:
                        model.model.layers[layer].output[:] += vector
            result = tracer.result.save()
        width = batch.input_ids.shape[1]
        for r, i in enumerate(batch.rows):
            out[i] = result[r, width:].tolist()
    return out
