"""The cost of one calibration (`saif_calibrated`: k = 15 latent weights refined for 8 rounds) as a ratio to one sweep
stage (the staged search's first stage for one task and method: 5 layers × 3 α = 15 conditions on 16 val prompts,
greedy generation of up to 48 tokens), both at the default profile's sizes on its model, side by side.

Calibration targets are no-instruction prompts of train passages teacher-forced on 40-token responses taken from the
passages' own text (the study uses the model's accepted prompted answers, of similar length: the same compute, other
tokens), as many as the default profile keeps at most: 64 train and 32 val. 8 rounds run (no early stop); a
calibration now runs until its val NLL settles, and `calibration.csv` says how many rounds each took, so its cost is
this one's × rounds / 8.

Beside it, one evaluation of the train and val targets (what every round starts with) reusing the blocks below the
steered layer (`block_outputs`, as `calibrate` does) against the full forward, at layers 15 and 25.
"""
from __future__ import annotations

import time
from functools import partial

import torch
from common import content_prompts, default_model, median_seconds, report

LAYERS, ALPHAS, N_VAL, MAX_NEW = (10, 15, 20, 25, 29), (0.3, 0.5, 0.7), 16, 48
K, N_TRAIN_TARGETS, N_VAL_TARGETS, RESPONSE_TOKENS, LAYER, N_ROUNDS = 15, 64, 32, 40, 15, 8


def calibration_targets(tokenizer, n: int, split: str):
    """`n` calibration targets: content-only prompts of `split` passages, each with a `RESPONSE_TOKENS`-token response."""
    from saif_utils.calibration import Targets
    from saif_utils.data import load_passages

    passages = load_passages()
    texts = passages[passages["split"] == split]["text"].head(n).tolist()
    responses = [tokenizer(text, add_special_tokens=False)["input_ids"][:RESPONSE_TOKENS] for text in texts]
    return Targets(content_prompts(tokenizer, n, split), responses)


def one_calibration(model, basis: torch.Tensor, weights: torch.Tensor, train, val) -> float:
    """Seconds for one `calibrate` of `weights` over `basis` with `N_ROUNDS` rounds run."""
    from saif_utils.calibration import CalibrationConfig, calibrate

    cfg = CalibrationConfig(max_rounds=N_ROUNDS, patience=N_ROUNDS)  # never stop early
    start = time.perf_counter()
    calibrate(model, LAYER, weights, basis, train, val, cfg, desc="bench calibration")
    return time.perf_counter() - start


def one_sweep_stage(model, vectors: torch.Tensor, prompts: list[list[int]]) -> float:
    """Seconds for the steered generations of one staged-search stage: every (layer, α) vector on every val prompt,
    the conditions of a layer sharing batches as the steering stage shares them."""
    from saif_utils.generation import generate_steered
    from saif_utils.interventions import AddVector

    start = time.perf_counter()
    for layer in LAYERS:
        rows = [prompt for _ in ALPHAS for prompt in prompts]
        per_row = torch.stack([vectors[layer] * alpha for alpha in ALPHAS for _ in prompts])
        generate_steered(model, rows, layer, AddVector(per_row), MAX_NEW, batch_size=256, desc="bench sweep stage")
    return time.perf_counter() - start


def evaluation_reuse(model, basis: torch.Tensor, weights: torch.Tensor, train, val) -> dict[str, float]:
    """Per layer, seconds of one evaluation of `train` and `val` reusing block outputs / the full forward (median of
    interleaved rounds), after checking that both give the same NLL."""
    from saif_utils.calibration import CalibrationConfig, block_outputs, target_nll

    size, splits = CalibrationConfig().batch_size, {"train": train, "val": val}

    def evaluate(layer: int, below: dict | None) -> list[float]:
        return [target_nll(model, layer, weights, basis, targets, size, below=below and below[split])[0]
                for split, targets in splits.items()]

    out = {}
    for layer in (15, 25):
        below = {split: block_outputs(model, layer, targets, size) for split, targets in splits.items()}
        if evaluate(layer, below) != evaluate(layer, None):
            raise AssertionError(f"layer {layer}: reusing the blocks below changed the NLL")
        times = median_seconds({"reuse": partial(evaluate, layer, below), "full": partial(evaluate, layer, None)},
                               repeats=3)
        out |= {f"evaluation_L{layer}_reuse_s": times["reuse"], f"evaluation_L{layer}_full_s": times["full"],
                f"evaluation_L{layer}_reuse_over_full": times["reuse"] / times["full"]}
    return out


def main() -> None:
    torch.manual_seed(0)
    _, model = default_model()
    d_model, tok = model._module.config.hidden_size, model.tokenizer
    # Random unit directions stand in for decoder rows and SAIF vectors: the compute does not depend on their values.
    basis = torch.nn.functional.normalize(torch.randn(K, d_model), dim=-1)
    weights = torch.rand(K) + 0.5
    vectors = {layer: torch.nn.functional.normalize(torch.randn(d_model), dim=0) * 30 for layer in LAYERS}
    train, val = calibration_targets(tok, N_TRAIN_TARGETS, "train"), calibration_targets(tok, N_VAL_TARGETS, "val")
    prompts = content_prompts(tok, N_VAL)
    stage_s = one_sweep_stage(model, vectors, prompts)
    calibration_s = one_calibration(model, basis, weights, train, val)
    reuse = evaluation_reuse(model, basis, weights, train, val)
    report("calibration", {"calibration_s": calibration_s, "sweep_stage_s": stage_s,
                           "calibration_over_sweep_stage": calibration_s / stage_s, **reuse,
                           "n_rounds": N_ROUNDS, "n_train_targets": len(train), "n_val_targets": len(val),
                           "n_stage_generations": len(LAYERS) * len(ALPHAS) * len(prompts)})


if __name__ == "__main__":
    main()
