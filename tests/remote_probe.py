"""Run the project's nnsight code paths on a profile's model locally and on NDIF (NDIF_HOST / NDIF_API_KEY from the
environment) and write how far they differ: residual reads, steered generation (one vector, and one vector per row in
a batch), steered log-probs, latent ablation (the SAE encoder inside the trace) in generation and log-probs, the logit
lens, the calibration gradient and the spliced cross-entropy; and the messages of a job that fails on the server and of a model it has not
deployed.

    python tests/remote_probe.py PROFILE OUT.json     (run inside the local NDIF's namespace: tools/ndif/ndif.sh exec)
"""
from __future__ import annotations

import json
import os
import sys

import nnsight
import torch

from saif_utils.calibration import Targets, steered_nll
from saif_utils.generation import generate_steered
from saif_utils.interventions import AblateLatents, AddVector, stack_edits
from saif_utils.likelihood import continuation_logprob
from saif_utils.models import chat_prompt, check_deployed, load_model, read_residual_tokens, remote_checkpoint
from saif_utils.profiles import get_profile
from saif_utils.saes import spliced_cross_entropy
from saif_utils.semantics import logit_lens

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
    # The torch threads a request runs on (Ray pins an actor's to 1; the project's CPU actor sets them) and ours.
    with remote.trace({"input_ids": torch.tensor([ids[0]])}, remote=True) as tracer:
        server_threads = nnsight.save(torch.get_num_threads())
        tracer.stop()
    report |= {"server_threads": int(server_threads), "client_threads": torch.get_num_threads()}

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
    # One vector per row, three rows in one batch.
    per_row = stack_edits([AddVector(torch.randn(local.config.hidden_size, generator=torch.Generator().manual_seed(i))
                                     * 4.0) for i in range(len(ids))])
    rows_local = generate_steered(local, ids, layers[-1], per_row, max_new_tokens=8, batch_size=3)
    rows_remote = generate_steered(remote, ids, layers[-1], per_row, max_new_tokens=8, batch_size=3, remote=True)
    report |= {"per_row_local": rows_local, "per_row_remote": rows_remote}
    # The logit lens of the toy SAE's decoder rows (norm and unembedding applied where the weights are).
    directions = toy_sae(local.config.hidden_size).W_dec.detach()[:8]
    report |= {"lens_local": logit_lens(local, directions, 5), "lens_remote": logit_lens(remote, directions, 5, True)}
    # Calibration: the gradient of the steered NLL with respect to latent weights, computed on the server.
    targets, weights = Targets(prefix, gen_local), torch.tensor([2.0, -1.0, 0.5, 1.5])
    nll_local, _, grad_local, *_ = steered_nll(local, layers[0], weights, directions[:4], targets, backward=True)
    nll_remote, _, grad_remote, *_ = steered_nll(remote, layers[0], weights, directions[:4], targets, backward=True,
                                             remote=True)
    report |= {"calibration_nll_abs_diff": abs(nll_local - nll_remote),
               "calibration_grad_max_abs_diff": float((grad_local - grad_remote).abs().max()),
               "calibration_grad_norm": float(grad_local.norm())}
    # Notebook 01's spliced cross-entropy: the SAE splices in on the server (as plain tensors), the LM head runs there.
    saes = {layers[0]: toy_sae(local.config.hidden_size), layers[-1]: toy_sae(local.config.hidden_size)}
    ce_local = spliced_cross_entropy(local, saes, ids, batch_size=2)
    ce_remote = spliced_cross_entropy(remote, saes, ids, batch_size=2, remote=True)
    report["spliced_ce_max_rel_diff"] = max(abs(ce_local[layer][k] - ce_remote[layer][k]) / abs(ce_local[layer][k])
                                            for layer in saes for k in ("ce_clean", "ce_spliced", "ce_zero", "kl"))
    report["spliced_ce_changes"] = all(ce_local[layer]["ce_spliced"] > ce_local[layer]["ce_clean"] for layer in saes)
    # A job that fails on the server (a vector of the wrong width) and a model the server has not deployed.
    try:
        generate_steered(remote, ids, layers[0], AddVector(torch.ones(7)), max_new_tokens=2, remote=True,
                         desc="the probe's broken edit")
        report["server_error"] = None
    except RuntimeError as err:
        report["server_error"] = str(err)
    try:
        check_deployed(os.environ["NDIF_HOST"], remote.to_model_key().replace(report["checkpoint"], "/not/deployed"))
        report["not_deployed_error"] = None
    except LookupError as err:
        report["not_deployed_error"] = str(err)
    with open(out_path, "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
