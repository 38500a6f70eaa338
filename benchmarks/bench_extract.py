"""Last-token activation extraction + SAE encoding (feature discovery's inner loop) vs a bare model forward over the
same left-padded batches. Targets: ≥ 0.9 at the final SAE layer, > 1 at a middle layer (the forward stops there)."""
from __future__ import annotations

import torch
from common import content_prompts, default_model, median_seconds, report

N_PROMPTS, BATCH = 64, 16


def main() -> None:
    from saif_utils.activations import encode
    from saif_utils.models import length_buckets, read_residual
    from saif_utils.saes import load_local_sae, shipped_sae_path

    profile, model = default_model()
    tok, hf = model.tokenizer, model._module
    ids = content_prompts(tok, N_PROMPTS, split="train")
    batches = list(length_buckets(ids, BATCH, tok.pad_token_id))

    def bare():
        with torch.inference_mode():
            for batch in batches:
                hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    layers = {"middle": profile.sae_layers[1], "final": profile.sae_layers[-1]}
    saes = {name: load_local_sae(shipped_sae_path(profile, layer)) for name, layer in layers.items()}

    def extract(name):
        return lambda: encode(saes[name], read_residual(model, ids, [layers[name]], batch_size=BATCH)[layers[name]])

    times = median_seconds({"bare": bare, **{name: extract(name) for name in layers}})
    figures = {"bare_forward_s": times["bare"]}
    for name, layer in layers.items():
        figures[f"{name}_layer"] = layer
        figures[f"{name}_extract_s"] = times[name]
        figures[f"{name}_over_bare"] = times["bare"] / times[name]
    figures["target_final_over_bare"] = 0.9
    report("extract", figures)


if __name__ == "__main__":
    main()
