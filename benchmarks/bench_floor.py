"""The compute floor of a cold reproduction: how close the model's forward passes run to this CPU's fp32
matrix-multiply peak, and how long the generation stages' arithmetic (notebooks 04 and 05) takes even at that peak.

    python bench_floor.py [RUN_DIR]     # RUN_DIR: a finished default run (default: ../outputs/default)

FLOPs count 2 × parameters per token through the decoder blocks and 2 × the LM head's parameters per token whose
logits are read; attention, norms and everything else are left out, so the floor is a lower bound. Notebook 05's
calibrations are counted as the least arithmetic that gives their numbers: each target's blocks up to the steered
layer once (their output does not depend on the vector), then per pass the blocks above it and the LM head at the
response positions, forward for every evaluation and forward plus the input-gradient backward (as many FLOPs again;
the frozen weights need no gradient) for every training pass.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import content_prompts, default_model, median_seconds, report

N_ROWS = 64


def sgemm_gflops(sizes: tuple[int, ...] = (2048, 3072, 4096), repeats: int = 5) -> float:
    """This CPU's fp32 matrix-multiply peak: the fastest of `repeats` n×n×n products at each size, after a warm-up.
    The best round, not the median: a floor needs the peak, and a median reads below it whenever other work shares
    the CPU, which would inflate the floor."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def parameter_counts(hf_model) -> tuple[int, int]:
    """(parameters in the decoder blocks, parameters of the LM head)."""
    from saif_utils.architectures import blocks, lm_head

    body = sum(p.numel() for p in blocks(hf_model).parameters())
    return body, lm_head(hf_model).weight.numel()


@torch.inference_mode()
def model_gflops(hf_model, ids: list[list[int]], pad_id: int) -> dict[str, float]:
    """Counted GFLOP/s of one prefill of `ids` (logits at the last position only) and of one decode step of the
    batch over that cache, as notebooks 04/05 run them."""
    from transformers import DynamicCache

    from saif_utils.models import length_buckets

    (batch,) = length_buckets(ids, len(ids), pad_id)
    body, head = parameter_counts(hf_model)
    n_rows, width = batch.input_ids.shape

    def prefill():
        cache = DynamicCache(config=hf_model.config)
        hf_model(batch.input_ids, attention_mask=batch.attention_mask, cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    cache = prefill()
    step_ids = torch.full((n_rows, 1), 28)
    step_mask = torch.cat([batch.attention_mask, torch.ones(n_rows, 1, dtype=torch.long)], 1)

    def decode():
        hf_model(step_ids, attention_mask=step_mask, cache=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # drop the decoded token: every round decodes over the same cache length

    times = median_seconds({"prefill": prefill, "decode": decode})
    return {"prefill": (2 * body * n_rows * width + 2 * head * n_rows) / times["prefill"] / 1e9,
            "decode": 2 * (body + head) * n_rows / times["decode"] / 1e9}


def generating(prompt: list[int], new, body: int, head: int) -> float:
    """FLOPs of generating `new` tokens after each prompt of `prompt` tokens (logits only where a token is chosen)."""
    return float(sum(2 * body * (p + n) + 2 * head * n for p, n in zip(prompt, new)))


def fluency(new, body: int, head: int) -> float:
    """FLOPs of scoring each response and its end-of-turn after the shared empty-turn prefix (which runs once)."""
    return float(2 * (body + head) * (np.asarray(new) + 1).sum())


def generation_flops(run_dir: Path, tokenizer, body: int, head: int, n_layers: int) -> dict[str, float]:
    """FLOPs of the distinct generations and teacher-forced log-probs the ablation and steering stages ran in `run_dir`,
    and of 05's calibrations."""
    import pandas as pd

    from saif_utils.data import evaluation_prompts, load_passages, load_tasks, load_variants, prompting_instructions
    from saif_utils.stages.steering import SweepConfig

    passages = load_passages().set_index("passage_id", drop=False)
    sweep_cfg = SweepConfig()  # 04 and 05 share the default tasks and prompting variant
    instructions = prompting_instructions(load_variants(tasks=load_tasks()), sweep_cfg.tasks, sweep_cfg.prompt_variant)

    def prompt_lengths(instruction: str | None) -> dict[str, int]:
        table = evaluation_prompts(tokenizer, passages, instruction, "post")
        return dict(zip(table["passage_id"], table["input_ids"].map(len)))

    plain = prompt_lengths(None)
    instructed = {task: prompt_lengths(text) for task, text in instructions.items()}
    out = {}
    sweep = pd.read_parquet(run_dir / "05_steering_sweeps" / "generations.parquet")
    asked = sweep["method"].isin(["prompting", "saif_plus_prompt"])
    sweep = sweep.assign(task=sweep["task"].where(sweep["method"] != "no_instruction", "-"))  # one run for all tasks
    sweep = sweep.drop_duplicates(["passage_id", "split", "task", "method", "layer", "k", "alpha", "position", "draw"])
    prompt = [instructed[t][p] if a else plain[p] for t, p, a in zip(sweep["task"], sweep["passage_id"], asked)]
    new = sweep["n_new_tokens"].to_numpy()
    out["05 generation"] = generating(prompt, new, body, head)
    out["05 fluency log-probs"] = fluency(new, body, head)
    out |= calibration_flops(run_dir, plain, instructed, body, head, n_layers)
    ablation = pd.read_parquet(run_dir / "04_causal_ablation" / "generations.parquet")
    ablation = ablation.assign(layer=ablation["layer"].where(ablation["condition"] != "none", -1))
    distinct = ablation.drop_duplicates(["passage_id", "task", "layer", "condition", "draw"])
    new = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in distinct["response"]]
    prompt = [instructed[t][p] for t, p in zip(distinct["task"], distinct["passage_id"])]
    out["04 generation"] = generating(prompt, new, body, head)
    out["04 log-probs"] = sum(2 * (body + head) * (p + n) for p, n in zip(prompt, new))
    return out


def calibration_flops(run_dir: Path, plain: dict[str, int], instructed: dict[str, dict[str, int]], body: int,
                      head: int, n_layers: int) -> dict[str, float]:
    """FLOPs of notebook 05's calibrations: generating and fluency-scoring the prompted train/val responses they are
    targets from, and the rounds each calibration ran (`calibration.csv`) over the responses the judge accepted."""
    import pandas as pd

    out_dir = run_dir / "05_steering_sweeps"
    if not (out_dir / "calibration_targets.parquet").is_file():
        return {}
    judged = pd.read_parquet(out_dir / "calibration_targets.parquet")
    # the prompting wording's length stands in for every variant's (they differ by a few tokens)
    prompt = [instructed[t][p] for t, p in zip(judged["task"], judged["passage_id"])]
    new = judged["n_new_tokens"].to_numpy()
    out = {"05 calibration targets": generating(prompt, new, body, head) + fluency(new, body, head)}
    history = pd.read_csv(out_dir / "calibration.csv")
    runs = history[history["calibrated"]].groupby(["task", "method"]).agg(rounds=("round", "max"),
                                                                          layer=("layer", "first"))
    accepted = judged[judged["kept"]] if "kept" in judged else judged[judged["strict"] & (judged["n_new_tokens"] > 0)]
    flops = 0.0
    for (task, _), run in runs.iterrows():
        below = body * (run.layer + 1) / n_layers  # blocks 0..layer: once per target
        above = body - below
        for split, passes in (("train", 3 * run.rounds + 1), ("val", run.rounds + 1)):  # a training pass counts 2×
            rows = accepted[(accepted["task"] == task) & (accepted["split"] == split)]
            tokens = rows["passage_id"].map(plain).to_numpy() + rows["n_new_tokens"].to_numpy()
            response_tokens = rows["n_new_tokens"].sum()
            flops += 2 * below * tokens.sum() + passes * (2 * above * tokens.sum() + 2 * head * response_tokens)
    return out | {"05 calibration": flops}


def study_floor(run_dir: Path, model) -> dict:
    """The CPU's sgemm peak, prefill and decode as shares of it and, for a finished run in `run_dir`, the seconds the
    study's arithmetic takes at that peak: 04 and 05 counted; 01–03, whose work is prefill-shaped forward passes,
    estimated as their seconds in `run_dir/timings.csv` × prefill's share of the peak; 06–07 (tables and figures)
    as zero. `floor_s study` is their sum, a lower bound on a cold run before kernel start-ups."""
    hf_model = model._module
    body, head = parameter_counts(hf_model)
    peak = sgemm_gflops()
    rates = model_gflops(hf_model, content_prompts(model.tokenizer, N_ROWS, split="train"), model.tokenizer.pad_token_id)
    prefill_share = rates["prefill"] / peak
    figures = {"sgemm_peak_gflops": round(peak, 1),
               "prefill_gflops": round(rates["prefill"], 1), "prefill_share_of_peak": round(prefill_share, 3),
               "decode_gflops": round(rates["decode"], 1), "decode_share_of_peak": round(rates["decode"] / peak, 3)}
    if not (run_dir / "05_steering_sweeps" / "generations.parquet").is_file():
        print(f"no finished run in {run_dir} (run `make reproduce` first): the study's floor is not computed")
        return figures
    n_layers = hf_model.config.num_hidden_layers
    floor_s = {name: f / (peak * 1e9)
               for name, f in generation_flops(run_dir, model.tokenizer, body, head, n_layers).items()}
    counted_s = sum(floor_s.values())
    figures |= {f"floor_s {name}": round(s, 1) for name, s in floor_s.items()}
    figures["floor_s 04+05"] = round(counted_s, 1)
    if (run_dir / "timings.csv").is_file():
        import pandas as pd

        seconds = pd.read_csv(run_dir / "timings.csv").set_index("stage")["seconds"]
        forward_s = seconds[seconds.index.str[:2].isin(["01", "02", "03"])].sum()
        figures["floor_s 01-03 (estimated)"] = round(forward_s * prefill_share, 1)
        figures["floor_s study"] = round(counted_s + forward_s * prefill_share, 1)
    return figures


def main() -> None:
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "outputs" / "default"
    _, model = default_model()
    report("floor", study_floor(run_dir, model))


if __name__ == "__main__":
    main()
