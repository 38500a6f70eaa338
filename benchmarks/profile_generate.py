"""Where steered generation spends its time: torch.profiler over one batch of the sweep's shape (64 prompts, 48
tokens, vector on every token at layer 15), grouped into matrix products, attention, other tensor ops and the rest
(Python: HF `generate`, nnsight). `python profile_generate.py` prints the top operators and one JSON line."""
from __future__ import annotations

import time

import torch
from common import content_prompts, default_model, report

N_PROMPTS, N_NEW, LAYER = 64, 48, 15


def main() -> None:
    from saif_utils.generation import generate_steered

    _, model = default_model()
    ids = content_prompts(model.tokenizer, N_PROMPTS, split="train")
    vector = torch.randn(model._module.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 50
    generate_steered(model, ids[:8], LAYER, vector, 4, batch_size=8)  # warm-up
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        generate_steered(model, ids, LAYER, vector, N_NEW, batch_size=N_PROMPTS, min_new_tokens=N_NEW)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    total_us = sum(e.self_cpu_time_total for e in events)
    groups = {"matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
              "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),}
    share = {name: sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total_us
             for name, prefixes in groups.items()}
    share["other_ops"] = 1 - sum(share.values())
    report("profile_generate", {"tokens_per_s": round(N_PROMPTS * N_NEW / wall, 1),
                                "profiled_op_seconds": round(total_us / 1e6, 1), "wall_seconds": round(wall, 1),
                                **{f"share_{k}": round(v, 3) for k, v in share.items()},
                                "python_outside_ops": round(1 - total_us / 1e6 / wall, 3)})


if __name__ == "__main__":
    main()
