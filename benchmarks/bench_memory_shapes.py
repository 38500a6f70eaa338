"""Peak memory of the real-scale profiles' largest batches at their configured sizes, with the published architecture
and random weights (`device_shapes.random_model`): one steered generation batch of notebook 05 and one of 04 (their
`gen_batch_size` rows, `max_new_tokens` each), 05's fluency log-prob batch, and one calibration backward chunk
(`CalibrationConfig.grad_rows` targets).

On a lent GPU (`--device cuda`) every phase runs at full depth and reports `torch.cuda.max_memory_allocated`. On the
CPU an 8–9B model does not fit beside anything else, so each phase runs in its own process with the first 4 and the
first 8 decoder blocks (real widths, heads and vocabulary) and its peak resident memory is extrapolated linearly in
depth — the weights, the KV cache and the activations autograd keeps all grow one block at a time:
peak(L) ≈ peak(8) + (L − 8) · (peak(8) − peak(4)) / 4. Checked on the default profile, which fits at full depth
(30 blocks): log-prob batch 1,996 MB extrapolated vs 1,959 measured, calibration chunk 1,670 vs 1,710 (±2 %); from
1 and 2 blocks the error was +52 %. The prompts are the repository's content prompts (≈ 60 tokens), repeated to
fill a batch; notebook 05's instructed prompts are ≈ 10–20 tokens longer.

    cd benchmarks && python bench_memory_shapes.py [--device cpu|cuda] [--profiles gemma-2-2b llama-3.1-8b gemma-2-9b]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import content_prompts, peak_rss_mb
from device_shapes import ARCHITECTURES, random_model

PHASES = ("generate_05", "generate_04", "logprob_05", "calibration_chunk")
SHALLOW = (4, 8)  # decoder blocks of the two CPU measurements a depth is extrapolated from


def reset_rss_peak() -> None:
    """Return freed heap pages and restart VmHWM (`common.peak_rss_mb`) at the current resident size."""
    from saif_utils.models import trim_heap

    trim_heap()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def run_phase(model, phase: str, rows_ids: list[list[int]], d_model: int) -> None:
    """One batch of `phase` at its configured size, steering decoder block 0 (present at every depth)."""
    from saif_utils.calibration import CalibrationConfig, Targets, frozen_weights, summed_gradient
    from saif_utils.generation import generate_steered
    from saif_utils.interventions import AddVector
    from saif_utils.likelihood import continuation_logprob
    from saif_utils.stages.ablation import AblationConfig
    from saif_utils.stages.steering import SweepConfig, nll_prefix

    steering, ablation = SweepConfig(), AblationConfig()
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    n_new = steering.max_new_tokens
    if phase in ("generate_05", "generate_04"):
        rows = steering.gen_batch_size if phase == "generate_05" else ablation.gen_batch_size
        ids = [rows_ids[i % len(rows_ids)] for i in range(rows)]
        generate_steered(model, ids, 0, AddVector(vector), n_new, batch_size=rows, min_new_tokens=n_new)
    elif phase == "logprob_05":
        rows = steering.gen_batch_size
        conts = [rows_ids[i % len(rows_ids)][-n_new:] for i in range(rows)]
        continuation_logprob(model, [nll_prefix(model.tokenizer)] * rows, conts, batch_size=rows)
    else:
        cfg = CalibrationConfig()
        targets = Targets([rows_ids[i % len(rows_ids)] for i in range(cfg.batch_size)],
                          [rows_ids[(i + 1) % len(rows_ids)][-n_new:] for i in range(cfg.batch_size)])
        with frozen_weights(model._module):
            summed_gradient(model, 0, vector, None, targets, cfg.grad_rows)


def measure(profile: str, phase: str, depth: int | None, device: str, tokenizer_dir: str) -> dict:
    """Peak memory of one phase on a fresh model of `depth` blocks (None: the published depth)."""
    model, spec = random_model(profile, tokenizer_dir, device, n_layers=depth)
    ids = content_prompts(model.tokenizer, 64)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_rss_peak()
    run_phase(model, phase, ids, spec.d_model)
    figures = {"profile": profile, "phase": phase, "blocks": depth or spec.n_layers, "rss_peak_mb": peak_rss_mb()}
    if device.startswith("cuda"):
        figures["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profiles", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--child", nargs=3, metavar=("PROFILE", "PHASE", "BLOCKS"), help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help="dequantised default-model dir (its tokenizer; ids valid in every vocab)")
    args = parser.parse_args()
    from saif_utils.models import dequantised_model_dir
    from saif_utils.profiles import get_profile

    tokenizer_dir = args.tokenizer or str(dequantised_model_dir(get_profile("default").model))
    if args.child:
        profile, phase, blocks = args.child
        print(json.dumps(measure(profile, phase, int(blocks) or None, args.device, tokenizer_dir)), flush=True)
        return
    for profile in args.profiles:
        model_spec = get_profile(profile).model
        for phase in args.phases:
            # One process per measurement: a peak is then that phase's alone, not an earlier phase's.
            depths = (0,) if args.device.startswith("cuda") else SHALLOW
            runs = [json.loads(subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--tokenizer", tokenizer_dir, "--child", profile,
                 phase, str(depth)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for depth in depths]
            figures = {"benchmark": "memory_shapes", "profile": profile, "phase": phase, "device": args.device,
                       "dtype": model_spec.dtype}
            if len(runs) == 2:
                (few, few_mb), (more, more_mb) = [(run["blocks"], run["rss_peak_mb"]) for run in runs]
                per_block = (more_mb - few_mb) / (more - few)
                extrapolated_mb = more_mb + (model_spec.n_layers - more) * per_block
                figures |= {f"rss_peak_mb_{few}_blocks": round(few_mb), f"rss_peak_mb_{more}_blocks": round(more_mb),
                            "rss_per_block_mb": round(per_block), "blocks": model_spec.n_layers,
                            "rss_peak_gb_extrapolated": round(extrapolated_mb / 1024, 2)}
            else:
                figures |= {"gpu_peak_gb": round(runs[0]["gpu_peak_mb"] / 1024, 2),
                            "rss_peak_gb": round(runs[0]["rss_peak_mb"] / 1024, 2)}
            print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
