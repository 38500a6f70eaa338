"""Last-token activation extraction + SAE encoding (feature discovery's inner loop) vs a bare model forward over the
same left-padded batches. Targets: ≥ 0.9 at the final SAE layer, > 1 at a middle layer (the forward stops there)."""
from __future__ import annotations

import torch

from common import content_prompts, default_model, median_seconds, report

N_PROMPTS, BATCH = 64, 16


def main() -> None:
    from saif_utils.discovery import encode
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

    figures = {"bare_forward_s": median_seconds(bare)}
    for name, layer in (("middle", profile.sae_layers[1]), ("final", profile.sae_layers[-1])):
        sae = load_local_sae(shipped_sae_path(profile, layer))

        def extract(layer=layer, sae=sae):
            encode(sae, read_residual(model, ids, [layer], batch_size=BATCH)[layer])

        seconds = median_seconds(extract)
        figures[f"{name}_layer"] = layer
        figures[f"{name}_extract_s"] = seconds
        figures[f"{name}_over_bare"] = figures["bare_forward_s"] / seconds
    figures["target_final_over_bare"] = 0.9
    report("extract", figures)


if __name__ == "__main__":
    main()
