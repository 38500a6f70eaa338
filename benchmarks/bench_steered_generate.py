"""Greedy generation of 64 new tokens for 8 prompts: saif_utils' nnsight steering (vector on every token) vs plain
Hugging Face `generate` vs a raw torch forward hook. Target: steered / plain throughput ≥ 0.95."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from common import content_prompts, default_model, median_seconds, report

N_PROMPTS, N_NEW, LAYER = 8, 64, 15


def steered_vs_plain(model, ids: Sequence[Sequence[int]], layer: int, vector: torch.Tensor, n_new: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Tokens/s of plain HF generate, a forward-hook steer and saif_utils' nnsight steer (exactly `n_new` tokens per
    prompt, all prompts in one batch), and the two ratios. `sync` waits for an asynchronous device before a clock read."""
    from saif_utils.architectures import blocks
    from saif_utils.generation import generate_steered
    from saif_utils.models import length_buckets

    tok, hf = model.tokenizer, model._module
    (batch,) = length_buckets(ids, len(ids), tok.pad_token_id)
    inputs = {"input_ids": batch.input_ids.to(hf.device), "attention_mask": batch.attention_mask.to(hf.device)}
    hook_vector = vector.to(hf.device, hf.dtype)
    gen_kwargs = {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def plain():
        with torch.inference_mode():
            hf.generate(**inputs, **gen_kwargs)
        sync()

    def hooked():
        handle = blocks(hf)[layer].register_forward_hook(lambda m, a, o: o + hook_vector)
        try:
            plain()
        finally:
            handle.remove()

    def steered():
        generate_steered(model, ids, layer, vector, n_new, batch_size=len(ids), min_new_tokens=n_new)
        sync()

    tokens = len(ids) * n_new
    times = median_seconds({"plain_hf_generate": plain, "torch_hook": hooked, "saif_utils_nnsight": steered})
    figures = {f"{k}_tok_per_s": tokens / v for k, v in times.items()}
    figures["steered_over_plain"] = times["plain_hf_generate"] / times["saif_utils_nnsight"]
    figures["steered_over_hook"] = times["torch_hook"] / times["saif_utils_nnsight"]
    return figures


def main() -> None:
    torch.manual_seed(0)
    _, model = default_model()
    ids = content_prompts(model.tokenizer, N_PROMPTS)
    vector = torch.randn(model._module.config.hidden_size) * 40
    figures = steered_vs_plain(model, ids, LAYER, vector, N_NEW)
    figures["target_steered_over_plain"] = 0.95
    report("steered_generate", figures)


if __name__ == "__main__":
    main()
