"""Print the README's results tables (markdown) from a run's outputs: steering results and ablation.

    .venv/bin/python tools/readme_tables.py outputs/default
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

METHODS = ["no_instruction", "prompting", "saif", "diff_in_means", "random_latents", "saif_plus_prompt"]


def cell(row, name: str) -> str:
    """'0.42 [0.29, 0.56]' for one accuracy and its CI."""
    return f"{row[f'{name}_acc']:.2f} [{row[f'{name}_ci_low']:.2f}, {row[f'{name}_ci_high']:.2f}]"


def steering_table(results: pd.DataFrame) -> str:
    lines = ["| task | method | config (layer, k, α, position) | n | strict [95 % CI] | loose [95 % CI] "
             "| strict, loops = fail | degenerate |", "|---|---|---|---|---|---|---|---|"]
    results = results.assign(order=results["method"].map(METHODS.index)).sort_values(["task", "order"])
    for row in results.to_dict("records"):
        config = "—"
        if pd.notna(row["layer"]):
            k = "—" if pd.isna(row["k"]) else int(row["k"])
            config = f"L{int(row['layer'])}, {k}, {row['alpha']:g}, {row['position']}"
        lines.append(f"| {row['task']} | {row['method']} | {config} | {row['n']} | {cell(row, 'strict')} | "
                     f"{cell(row, 'loose')} | {cell(row, 'fluent_strict')} | {row['degenerate_rate']:.2f} |")
    return "\n".join(lines)


def ablation_table(table: pd.DataFrame) -> str:
    lines = ["| task | layer | ablated | n | strict [95 % CI] | loose [95 % CI] | log-prob drop [95 % CI] |",
             "|---|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        drop = f"{row['logprob_drop']:.3f} [{row['logprob_drop_ci_low']:.3f}, {row['logprob_drop_ci_high']:.3f}]"
        lines.append(f"| {row['task']} | {row['layer']} | {row['condition']} | {row['n']} | {cell(row, 'strict')} | "
                     f"{cell(row, 'loose')} | {drop} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/default")
    print(steering_table(pd.read_csv(run / "05_steering_sweeps" / "results.csv")), end="\n\n")
    print(ablation_table(pd.read_csv(run / "04_causal_ablation" / "ablation.csv")))
