"""Greedy generation of 64 new tokens for 8 prompts: saif_utils' nnsight steering (vector on every token) vs plain
Hugging Face `generate` vs a raw torch forward hook. Target: steered / plain throughput ≥ 0.95."""
from __future__ import annotations

import torch

from common import content_prompts, default_model, median_seconds, report

N_PROMPTS, N_NEW, LAYER = 8, 64, 15


def main() -> None:
    from saif_utils.models import length_buckets
    from saif_utils.steering import generate_steered

    torch.manual_seed(0)
    _, model = default_model()
    tok, hf = model.tokenizer, model._module
    ids = content_prompts(tok, N_PROMPTS)
    vector = torch.randn(hf.config.hidden_size) * 40
    (batch,) = length_buckets(ids, N_PROMPTS, tok.pad_token_id)
    gen_kwargs = {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def plain():
        with torch.inference_mode():
            hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **gen_kwargs)

    def hooked():
        handle = hf.model.layers[LAYER].register_forward_hook(lambda m, a, o: o + vector)
        try:
            plain()
        finally:
            handle.remove()

    def steered():
        generate_steered(model, ids, LAYER, vector, N_NEW, batch_size=N_PROMPTS, min_new_tokens=N_NEW)

    tokens = N_PROMPTS * N_NEW
    times = median_seconds({"plain_hf_generate": plain, "torch_hook": hooked, "saif_utils_nnsight": steered})
    figures = {f"{k}_tok_per_s": tokens / v for k, v in times.items()}
    figures["steered_over_plain"] = times["plain_hf_generate"] / times["saif_utils_nnsight"]
    figures["steered_over_hook"] = times["torch_hook"] / times["saif_utils_nnsight"]
    figures["target_steered_over_plain"] = 0.95
    report("steered_generate", figures)


if __name__ == "__main__":
    main()
