"""Run the project's nnsight code paths on a profile's model locally and on NDIF (NDIF_HOST / NDIF_API_KEY from the
environment) and write how far they differ: residual reads, steered generation, steered log-probs, and
latent ablation (the SAE encoder inside the trace) in generation and log-probs.

    python tests/remote_probe.py PROFILE OUT.json     (run inside the local NDIF's namespace: tools/ndif/ndif.sh exec)
"""
from __future__ import annotations

import json
import sys

import torch

from saif_utils.interventions import AblateLatents, AddVector
from saif_utils.likelihood import continuation_logprob
from saif_utils.models import chat_prompt, load_model, read_residual_tokens, remote_checkpoint
from saif_utils.generation import generate_steered
from saif_utils.profiles import get_profile

PASSAGES = ["The cat sleeps on the warm windowsill.", "Bees dance to show where the flowers are.",
            "The library will be closed on Monday for repairs."]


def toy_sae(d_in: int, d_sae: int = 64):
    """A seeded random TopK SAE (decoder-norm rescaling on, as the project's SAEs) whose latents fire on anything."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=16, rescale_acts_by_decoder_norm=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) * 2)
    return sae


def main(profile_name: str, out_path: str) -> None:
    local_profile, remote_profile = get_profile(profile_name), get_profile(profile_name, remote=True)
    local, remote = load_model(local_profile), load_model(remote_profile)
    tok = local.tokenizer
    ids = tok([chat_prompt(tok, p) for p in PASSAGES], add_special_tokens=False)["input_ids"]
    layers = list(local_profile.sae_layers)
    torch.manual_seed(0)
    steer = AddVector(torch.randn(local.config.hidden_size) * 4.0)  # travels with the trace
    report: dict = {"checkpoint": remote_checkpoint(remote_profile.model), "model_key": remote.to_model_key()}

    res_local = read_residual_tokens(local, ids, layers, batch_size=2)
    res_remote = read_residual_tokens(remote, ids, layers, batch_size=2, remote=True)
    report["residual_max_abs_diff"] = {str(layer): float((res_local[layer] - res_remote[layer]).abs().max())
                                       for layer in layers}
    gen_local = generate_steered(local, ids, layers[0], steer, max_new_tokens=8, batch_size=2)
    gen_remote = generate_steered(remote, ids, layers[0], steer, max_new_tokens=8, batch_size=2, remote=True)
    plain = generate_steered(local, ids, layers[0], None, max_new_tokens=8, batch_size=2)
    report |= {"generated_local": gen_local, "generated_remote": gen_remote, "steering_changed_tokens": gen_local != plain}
    prefix = [tok(chat_prompt(tok, ""), add_special_tokens=False)["input_ids"]] * len(ids)
    lp_local = continuation_logprob(local, prefix, gen_local, layers[0], steer, batch_size=2)
    lp_remote = continuation_logprob(remote, prefix, gen_local, layers[0], steer, batch_size=2, remote=True)
    report["logprob_max_abs_diff"] = float(abs(lp_local - lp_remote).max())
    # Latent ablation: the SAE's encoder runs inside the trace, its weights shipped by value (SAEWeights).
    ablate = AblateLatents(toy_sae(local.config.hidden_size), tuple(range(0, 64, 4)), "toy")
    abl_local = generate_steered(local, ids, layers[0], ablate, max_new_tokens=8, batch_size=2)
    abl_remote = generate_steered(remote, ids, layers[0], ablate, max_new_tokens=8, batch_size=2, remote=True)
    report |= {"ablated_local": abl_local, "ablated_remote": abl_remote, "ablation_changed_tokens": abl_local != plain}
    alp_local = continuation_logprob(local, prefix, abl_local, layers[0], ablate, batch_size=2)
    alp_remote = continuation_logprob(remote, prefix, abl_local, layers[0], ablate, batch_size=2, remote=True)
    report["ablated_logprob_max_abs_diff"] = float(abs(alp_local - alp_remote).max())
    with open(out_path, "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
