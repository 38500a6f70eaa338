"""Wall time of `make reproduce` on a profile, cold (an empty cache directory: the dequantised model, activations,
residuals, generations and log-probs are all rebuilt; the shipped SAEs are reused) and then warm (the same cache
directory, every entry present). Targets on a 2-core CPU for the default profile: cold ≤ 20 min, warm ≤ 2 min, and
cold ≤ 1.25 × the study's compute floor (`bench_floor.study_floor` of the cold run, measured right after it in the
same process).

    python bench_reproduce.py [--profile default] [--warm-only]

`--warm-only` times one warm run against the user's own cache (after a previous `make reproduce`).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report

from saif_utils.paths import REPO_ROOT

TARGET_S = {"cold": 20 * 60, "warm": 2 * 60}
TARGET_COLD_OVER_FLOOR = 1.25


def timed_reproduce(profile: str, output_dir: Path, cache_dir: Path | None) -> tuple[float, dict[str, float]]:
    """Run `make reproduce` into `output_dir` (with SAIF_CACHE_DIR=`cache_dir` when given); return the wall time and
    the per-notebook seconds and peak resident memory (MB) the pipeline recorded."""
    env = dict(os.environ) | ({"SAIF_CACHE_DIR": str(cache_dir)} if cache_dir else {})
    start = time.perf_counter()
    subprocess.run(["make", "-s", "reproduce", f"PROFILE={profile}", f"ARGS=--output-dir {output_dir}"],
                   cwd=REPO_ROOT, env=env, check=True, stdout=sys.stderr)
    seconds = time.perf_counter() - start
    with open(output_dir / "timings.csv") as fh:
        rows = list(csv.DictReader(fh))
    stages = {f"{row['stage']}_s": float(row["seconds"]) for row in rows}
    stages |= {f"{row['stage']}_peak_mb": float(row["peak_rss_mb"]) for row in rows if row.get("peak_rss_mb")}
    return seconds, stages


def cold_floor(output_dir: Path, cold_s: float) -> dict:
    """The study's compute floor of the cold run in `output_dir` (`bench_floor.study_floor`) and cold / floor."""
    from bench_floor import study_floor
    from common import default_model

    floor = study_floor(output_dir, default_model()[1])
    figures = {f"cold {name}": value for name, value in floor.items()}
    figures["cold_over_floor"] = round(cold_s / floor["floor_s study"], 3)
    figures["cold_over_floor_target"] = TARGET_COLD_OVER_FLOOR
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--warm-only", action="store_true", help="time one warm run against the user's cache")
    args = parser.parse_args()
    figures: dict = {"profile": args.profile, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="saif-bench-") as tmp:
        output_dir = Path(tmp) / "outputs"
        cache_dir = None if args.warm_only else Path(tmp) / "cache"
        runs = ("warm",) if args.warm_only else ("cold", "warm")
        if args.warm_only:  # the outputs of one run first, so the timed run is a rerun of every notebook
            timed_reproduce(args.profile, output_dir, None)
        for run in runs:
            seconds, stages = timed_reproduce(args.profile, output_dir, cache_dir)
            figures[f"{run}_s"] = round(seconds, 1)
            figures |= {f"{run}_{stage}": value for stage, value in stages.items()}
            if args.profile == "default":
                figures[f"{run}_over_target"] = round(seconds / TARGET_S[run], 3)
                if run == "cold":  # before the warm run rewrites timings.csv
                    figures |= cold_floor(output_dir, seconds)
    if "cold_s" in figures:
        figures["warm_over_cold"] = round(figures["warm_s"] / figures["cold_s"], 3)
    report("reproduce", figures)


if __name__ == "__main__":
    main()
