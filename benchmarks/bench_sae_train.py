"""SAE training throughput, split into activation collection (forward to the hooked layer, residuals of every token)
and optimisation (sae-lens SAETrainer on cached activations), against the model's bare forward throughput."""
from __future__ import annotations

from dataclasses import replace

import torch
from common import content_prompts, default_model, median_seconds, report

LAYER, BATCH, N_PROMPTS = 15, 16, 64


def main() -> None:
    from saif_utils.models import length_buckets, read_residual_tokens
    from saif_utils.saes import train_sae

    profile, model = default_model()
    tok, hf = model.tokenizer, model._module
    ids = content_prompts(tok, N_PROMPTS, split="train")
    n_tokens = sum(len(s) for s in ids)
    batches = list(length_buckets(ids, BATCH, tok.pad_token_id))

    def bare():
        with torch.inference_mode():
            for batch in batches:
                hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    def collect():
        return read_residual_tokens(model, ids, [LAYER], batch_size=BATCH, dtype=torch.float16)

    acts = collect()[LAYER].numpy()
    # the default SAE shape, 4 short epochs over what was collected: optimisation speed, not SAE quality
    recipe = replace(profile.sae_train, n_train_tokens=len(acts) - len(acts) % 256, epochs=4, batch_size=256,
                     lr_warm_up_steps=1, dead_feature_window=10)
    times = median_seconds({"bare": bare, "collect": collect,
                            "optimise": lambda: train_sae(acts[: recipe.n_train_tokens], recipe, LAYER, "bench")},
                           repeats=3)
    samples = recipe.total_steps * recipe.batch_size
    report("sae_train", {
        "bare_forward_tok_per_s": n_tokens / times["bare"],
        "collect_tok_per_s": len(acts) / times["collect"],
        "collect_over_bare": (len(acts) / times["collect"]) / (n_tokens / times["bare"]),
        "optimise_samples_per_s": samples / times["optimise"],
        "d_sae": recipe.d_sae, "k": recipe.k, "layer": LAYER,
    })


if __name__ == "__main__":
    main()
