"""saif_utils' model-side paths on any torch device, at the published shapes of the profiles' models with random
weights: checks that steering, residual reads and continuation log-probs agree across their code paths there (and
return CPU tensors), and times steered against plain generation as bench_steered_generate does.

Made for a lent GPU, where no checkpoint can be fetched: timings hold for any weights of the shape (every prompt
generates exactly the same number of tokens); the checks test device placement and path agreement, not what a
model says. SAE-side paths (sae-lens) are not exercised here. Not part of `make bench` (that one runs on the CPU):

    cd benchmarks && python device_shapes.py --device cuda --profiles default gemma-2-2b llama-3.1-8b
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from bench_steered_generate import steered_vs_plain
from common import content_prompts

# Published architectures (config.json of each checkpoint); rotary settings stay at their defaults, which changes no
# cost. The default profile's architecture is read from the dequantised GGUF's config.json instead (--tokenizer dir).
ARCHITECTURES = {
    "gemma-2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                                  final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")),
    "gemma-2-9b": ("gemma2", dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                  query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                                  final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")),
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)),
}


def random_model(profile_name: str, source_dir: str, device: str, n_layers: int | None = None):
    """The profile's architecture with random weights on `device` (`n_layers` decoder blocks instead of the published
    number, when given), wrapped like `load_model`, and the default tokenizer (its ids are valid in every vocabulary
    here)."""
    from nnsight import TransformersModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from saif_utils.profiles import get_profile

    spec = get_profile(profile_name).model
    if profile_name in ARCHITECTURES:
        model_type, arch = ARCHITECTURES[profile_name]
        config = AutoConfig.for_model(model_type, **arch)
    else:
        config = AutoConfig.from_pretrained(source_dir)
    if (config.num_hidden_layers, config.hidden_size) != (spec.n_layers, spec.d_model):
        raise ValueError(f"{profile_name}: architecture has {config.num_hidden_layers} layers × {config.hidden_size}, "
                         f"the profile says {spec.n_layers} × {spec.d_model}")
    if n_layers is not None:  # the first blocks of the published stack (Gemma-2 alternates its attention types)
        config.num_hidden_layers = n_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:n_layers]
    torch.manual_seed(0)
    with torch.device(device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    tokenizer.padding_side = "left"
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation"), spec


def path_checks(model, ids: list[list[int]], layer: int, n_new: int, tol: float) -> dict[str, float | bool]:
    """Agreement of the code paths that must agree, on this device."""
    from saif_utils.generation import generate_steered
    from saif_utils.interventions import AddVector
    from saif_utils.likelihood import continuation_logprob
    from saif_utils.models import read_residual
    from saif_utils.stages.steering import nll_prefix

    batched = read_residual(model, ids, [layer], batch_size=len(ids))[layer].float()
    # every prompt opens with the same chat preamble: one group, its prefix run once
    shared = read_residual(model, ids, [layer], batch_size=len(ids), groups=[0] * len(ids))[layer].float()
    resid_err = float(((batched - shared).norm(dim=-1) / batched.norm(dim=-1)).max())

    d_model = batched.shape[-1]
    plain = generate_steered(model, ids, layer, None, n_new, batch_size=len(ids))
    zero = generate_steered(model, ids, layer, torch.zeros(d_model), n_new, batch_size=len(ids))
    per_row = torch.randn(len(ids), d_model)
    per_row *= 4 * batched.norm(dim=-1).mean() / per_row.norm(dim=-1, keepdim=True)  # 4 × the residual's norm
    per_row[0] = 0
    mixed = generate_steered(model, ids, layer, AddVector(per_row), n_new, batch_size=len(ids))

    prefix = [nll_prefix(model.tokenizer)] * len(ids)
    conts = [g or [model.tokenizer.eos_token_id] for g in plain]
    lp_shared = continuation_logprob(model, prefix, conts, batch_size=len(ids))  # shared prefix, no edit
    lp_batched = continuation_logprob(model, prefix, conts, layer, AddVector(torch.zeros(d_model)), len(ids))
    lp_diff = float(abs(lp_shared - lp_batched).max())
    return {"zero_vector_tokens_equal_plain": zero == plain,
            "per_row_zero_row_equal_plain": mixed[0] == plain[0],
            "per_row_steered_rows_differ": any(m != p for m, p in zip(mixed[1:], plain[1:])),
            "residual_on_cpu": batched.device.type == shared.device.type == "cpu",
            "residual_shared_prefix_max_rel_err": resid_err, "residual_paths_agree": resid_err < tol,
            "logprob_max_abs_diff": lp_diff, "logprob_paths_agree": lp_diff < tol}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profiles", nargs="+", default=["default", "gemma-2-2b", "llama-3.1-8b"])
    parser.add_argument("--tokenizer", help="dequantised default-model dir (config.json + tokenizer); default: built "
                                            "from the shipped GGUF")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64], help="prompts per timed batch")
    args = parser.parse_args()
    from saif_utils.models import dequantised_model_dir
    from saif_utils.profiles import get_profile

    if args.tokenizer is None:
        args.tokenizer = str(dequantised_model_dir(get_profile("default").model))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for name in args.profiles:
        start = time.perf_counter()
        model, spec = random_model(name, args.tokenizer, args.device)
        layer = get_profile(name).sae_layers[1]
        ids = content_prompts(model.tokenizer, max(args.rows))
        tol = 1e-3 if spec.dtype == "float32" else 5e-2
        figures: dict = {"profile": name, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else "cpu", "dtype": spec.dtype, "layer": layer, "build_s": time.perf_counter() - start}
        figures |= path_checks(model, ids[:8], layer, 16, tol)
        vector = torch.randn(spec.d_model) * 4
        for rows in args.rows:
            timed = steered_vs_plain(model, ids[:rows], layer, vector, 64, sync)
            figures |= {f"{key}@{rows}": round(value, 4) for key, value in timed.items()}
        if args.device.startswith("cuda"):
            figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(figures), flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
