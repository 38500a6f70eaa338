"""Print the README's results tables (markdown) from a run's outputs: steering results and ablation.

    .venv/bin/python tools/readme_tables.py outputs/default
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from saif_utils.report import ablation_table, steering_table

if __name__ == "__main__":
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/default")
    print(steering_table(pd.read_csv(run / "05_steering_sweeps" / "results.csv")), end="\n\n")
    print(ablation_table(pd.read_csv(run / "04_causal_ablation" / "ablation.csv")))
