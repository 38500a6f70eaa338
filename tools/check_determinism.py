"""Run the whole study twice on one profile, each run with its own empty cache directory, and check that every table
of notebooks 01–05 (CSV and parquet) is byte-identical: `python tools/check_determinism.py --profile default`
(`make check-determinism`).

Exit status 0 when every file matches, 1 otherwise. Each run is a cold `make reproduce` (≈ 40 min each on the default
profile on 2 CPU cores); the runs write to a temporary folder, so outputs/<profile> is left as it was, unless
`--keep DIR` names a folder to keep both runs (outputs and caches) in. Each run prints its per-notebook times.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from saif_utils.io import sha256_file
from saif_utils.pipeline import deterministic_files, differing_cache_entries, run_pipeline
from saif_utils.profiles import get_profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--keep", type=Path, default=None, help="keep both runs in this folder (must not exist)")
    args = parser.parse_args(argv)
    try:  # refused before two long runs start
        get_profile(args.profile)
    except ValueError as err:
        parser.error(str(err))
    if args.keep is not None:
        if args.keep.exists():  # it could hold a warm cache, which would hide a difference
            parser.error(f"--keep {args.keep} already exists; name a folder that does not")
        args.keep.mkdir(parents=True)
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="saif-determinism-") as tmp:
        runs, caches = [], []
        for run in ("a", "b"):
            caches.append(Path(tmp) / f"cache-{run}")
            os.environ["SAIF_CACHE_DIR"] = str(caches[-1])
            output_dir = Path(tmp) / f"run-{run}"
            print(f"== run {run}: {args.profile} → {output_dir} (empty cache)", flush=True)
            run_pipeline(args.profile, output_dir)
            runs.append(output_dir)
        names = deterministic_files(runs[0])
        mismatched = sorted(set(names) ^ set(deterministic_files(runs[1])))  # a table only one run wrote
        for name in names:
            if name in mismatched:
                continue
            first, second = (sha256_file(run / name) for run in runs)
            print(f"{'same' if first == second else 'DIFFERENT':>9}  {first[:16]}  {second[:16]}  {name}")
            if first != second:
                mismatched.append(name)
        if mismatched:  # while both caches still exist
            print(f"cache entries that differ (the earliest stage's is where it started): "
                  f"{differing_cache_entries(*caches)}", file=sys.stderr)
    if mismatched:
        print(f"not deterministic: {mismatched}", file=sys.stderr)
        raise SystemExit(1)
    print(f"deterministic: all {len(names)} tables byte-identical across two cold runs of {args.profile}")


if __name__ == "__main__":
    main()
