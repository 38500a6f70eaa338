"""Run every numbered notebook with papermill on one profile: `python -m saif_utils.pipeline --profile default`."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import pandas as pd

from .io import cache_root, remove_stale_temporaries, write_table
from .profiles import PROFILES, get_profile

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def numbered_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The study's notebooks in run order (`NN_stage.ipynb`)."""
    return sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def default_output_dir(profile: str) -> Path:
    """Where a profile's run writes: `outputs/<profile>` at the repository root."""
    return REPO_ROOT / "outputs" / profile


def stage_dir(output_dir: str | Path | None, profile: str, stage: str) -> Path:
    """A stage's output folder `<output_dir>/<stage>` (created), `output_dir` defaulting to outputs/<profile>."""
    path = Path(output_dir) if output_dir else default_output_dir(profile)
    path = path / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def jupyter_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """Keep kernels' IPython/Jupyter state inside the repository instead of the user's home."""
    state = root / ".jupyter-state"
    for sub in ("ipython", "config", "data", "runtime"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    return {"IPYTHONDIR": str(state / "ipython"), "JUPYTER_CONFIG_DIR": str(state / "config"),
            "JUPYTER_DATA_DIR": str(state / "data"), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
            "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def parse_value(text: str):
    """Parse a `-p name value` override the way papermill's CLI does (YAML scalars and lists)."""
    import yaml

    return yaml.safe_load(text)


def run_notebook(notebook: Path, output_dir: Path, parameters: dict, log_output: bool = False) -> Path:
    """Execute one notebook into `output_dir/<stage>/<stage>.ipynb`; papermill raises on the first failing cell."""
    import papermill

    stage_dir = output_dir / notebook.stem
    stage_dir.mkdir(parents=True, exist_ok=True)
    executed = stage_dir / notebook.name
    papermill.execute_notebook(
        str(notebook), str(executed), parameters=parameters, kernel_name="python3",
        cwd=str(REPO_ROOT), progress_bar=False, log_output=log_output,
    )
    return executed


SECRET_NAME = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)


def check_parameters(extra: dict) -> None:
    """Refuse a parameter that looks like a credential: keys come from the environment only (an executed notebook
    records every parameter it was given)."""
    secret = sorted(name for name in extra if SECRET_NAME.search(name))
    if secret:
        raise ValueError(f"parameters {secret} look like credentials; secrets are never notebook parameters — "
                         f"set them in the environment (e.g. NDIF_API_KEY) instead")


def run_pipeline(profile: str, output_dir: Path | None = None, remote: bool = False, only: list[str] | None = None,
                 extra: dict | None = None) -> pd.DataFrame:
    """Run the numbered notebooks in order, printing one line per notebook; return the per-stage timings."""
    get_profile(profile, remote=remote)  # fail fast on a bad profile before starting any kernel
    check_parameters(extra or {})
    output_dir = Path(output_dir) if output_dir else default_output_dir(profile)
    # A run killed mid-write (SIGKILL, OOM) leaves temporaries; they are never read, but nothing partial should stay.
    for root in (cache_root(), output_dir):
        remove_stale_temporaries(root)
    os.environ.update(jupyter_env())
    notebooks = [nb for nb in numbered_notebooks() if not only or any(nb.stem.startswith(o) for o in only)]
    if not notebooks:
        raise ValueError(f"no notebook matches only={only}; available: {[nb.stem for nb in numbered_notebooks()]}")
    parameters = {"profile": profile, "output_dir": str(output_dir), "remote": remote} | (extra or {})
    rows = []
    start_all = time.perf_counter()
    for i, notebook in enumerate(notebooks, 1):
        start = time.perf_counter()
        print(f"[{i}/{len(notebooks)}] {notebook.stem} …", flush=True)
        try:
            executed = run_notebook(notebook, output_dir, parameters)
        except Exception as err:  # papermill's PapermillExecutionError carries the cell; anything else is a setup error
            cell = getattr(err, "exec_count", None)
            where = output_dir / notebook.stem / notebook.name
            print(f"FAILED {notebook.stem} at cell {cell}: {getattr(err, 'ename', type(err).__name__)}: "
                  f"{getattr(err, 'evalue', err)}\n  partially executed notebook: {where}\n"
                  f"  earlier stages' outputs are kept in {output_dir}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        seconds = time.perf_counter() - start
        rows.append({"stage": notebook.stem, "seconds": round(seconds, 1), "executed_notebook": str(executed)})
        record_timing(output_dir / "timings.csv", rows[-1])  # after each stage: the report (06) reads it
        print(f"[{i}/{len(notebooks)}] {notebook.stem} done in {seconds:.1f} s", flush=True)
    total = time.perf_counter() - start_all
    print(f"all {len(notebooks)} notebooks done in {total:.1f} s → {output_dir}", flush=True)
    return pd.DataFrame(rows)


def record_timing(path: Path, row: dict) -> None:
    """Set one stage's row in a run's timings.csv (other stages' rows, e.g. from an earlier `--only` run, are kept)."""
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(row))
    table = pd.concat([table[table["stage"] != row["stage"]], pd.DataFrame([row])], ignore_index=True)
    write_table(table.sort_values("stage").reset_index(drop=True), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="default", help=f"one of {sorted(PROFILES)}")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: outputs/<profile>")
    parser.add_argument("--remote", action="store_true", help="run every trace on NDIF (needs NDIF_API_KEY)")
    parser.add_argument("--only", nargs="*", help="run only notebooks whose name starts with these prefixes")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="papermill parameter passed to every notebook, e.g. -p retrain_sae true")
    args = parser.parse_args(argv)
    extra = {name: parse_value(value) for name, value in args.parameter}
    run_pipeline(args.profile, args.output_dir, args.remote, args.only, extra)


if __name__ == "__main__":
    main()
