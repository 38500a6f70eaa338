"""Run every numbered notebook with papermill on one profile: `python -m saif_utils.pipeline --profile default`."""
from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import pandas as pd

from .context import RunDir
from .data import DataSources
from .io import cache_root, remove_stale_temporaries, write_table
from .paths import NOTEBOOK_DIR, REPO_ROOT
from .plugins import load_plugins, plugin_argument
from .profiles import PROFILES, get_profile, is_profile_file
from .progress import TEXT_PROGRESS, LiveStatus, clock, failed_line, live_engine


def numbered_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The study's notebooks in run order (`NN_stage.ipynb`)."""
    return sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def jupyter_env(state: Path) -> dict[str, str]:
    """Environment for kernels: IPython/Jupyter state under `state` (never the user's home), no wandb, loop progress
    bars as text (which the runner shows live)."""
    for sub in ("ipython", "config", "data", "runtime"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    return {"IPYTHONDIR": str(state / "ipython"), "JUPYTER_CONFIG_DIR": str(state / "config"),
            "JUPYTER_DATA_DIR": str(state / "data"), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
            "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", TEXT_PROGRESS: "1"}


@contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore exactly what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parse_value(text: str):
    """Parse a `-p name value` override the way papermill's CLI does (YAML scalars and lists)."""
    import yaml

    return yaml.safe_load(text)


def run_notebook(notebook: Path, output_dir: Path, parameters: dict, log_output: bool = False, km=None,
                 status: LiveStatus | None = None) -> Path:
    """Execute one notebook into `output_dir/<stage>/<stage>.ipynb`; papermill raises on the first failing cell.

    `km` is an already started kernel (`kernels_ahead`); without it papermill starts a fresh one. `status` receives
    each cell's start and the kernel's progress bars."""
    import papermill
    from papermill.engines import papermill_engines

    stage_dir = output_dir / notebook.stem
    stage_dir.mkdir(parents=True, exist_ok=True)
    executed = stage_dir / notebook.name
    engine = None
    if status is not None:
        engine = f"saif-live-{id(status)}"
        papermill_engines.register(engine, live_engine(status))
    try:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=parameters, kernel_name="python3", engine_name=engine,
            cwd=str(REPO_ROOT), progress_bar=False, log_output=log_output, km=km,
        )
    finally:
        if engine is not None:  # papermill's default engine is registered under None: never drop it
            papermill_engines._engines.pop(engine)
    return executed


def code_cells(notebook: Path) -> int:
    """How many code cells a notebook has (papermill adds one for the injected parameters)."""
    return sum(cell["cell_type"] == "code" for cell in json.loads(notebook.read_text())["cells"]) + 1


# Libraries saif_utils imports inside its functions (so `import saif_utils` stays light); a notebook's own import
# cells do not name them, but its first model or SAE call needs them.
LAZY_IMPORTS = ("transformers", "nnsight", "sae_lens")


def notebook_imports(notebook: Path) -> list[str]:
    """Modules a notebook's code cells import at top level (`import a.b`, `from a.b import c`), in order of appearance."""
    modules: list[str] = []
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse("".join(cell["source"]))
        except SyntaxError:  # IPython magics; such a cell's imports are simply not preloaded
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                modules += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.append(node.module)
    return list(dict.fromkeys(modules))


PRELOAD_CODE = """\
def _saif_preload(names):
    import importlib
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # left for the notebook's own import cell to report
            pass
_saif_preload({names!r})
del _saif_preload
"""


def start_kernel(preload: Sequence[str], timeout: float = 120):
    """Start a `python3` kernel in the repository root and wait until it has imported `preload`.

    The modules are imported inside a function, so they land in `sys.modules` but never in the notebook's namespace:
    a notebook that forgets an import still fails as it would in JupyterLab. A module that fails to import is left
    for the notebook's own import cell to report."""
    from jupyter_client import KernelManager

    # IPC sockets in a private folder instead of TCP ports: nothing listens on the network, and the kernel has no
    # reason to warn "Kernel is running over TCP without encryption". nbclient drives the kernel with asyncio, so the
    # manager hands it an asynchronous client.
    sockets = Path(tempfile.mkdtemp(prefix="saif-kernel-"))
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(sockets / "kernel"),
                       client_class="jupyter_client.asynchronous.AsyncKernelClient")
    try:
        km.start_kernel(cwd=str(REPO_ROOT))
    except BaseException:
        shutil.rmtree(sockets, ignore_errors=True)
        raise
    kc = km.blocking_client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=timeout)
        kc.execute_interactive(PRELOAD_CODE.format(names=list(preload)), silent=True, store_history=False,
                               timeout=timeout, output_hook=lambda msg: None)
    except BaseException:
        stop_kernel(km, now=True)
        raise
    finally:
        kc.stop_channels()
    return km


def stop_kernel(km, now: bool = False) -> None:
    """Shut a `start_kernel` kernel down and remove its socket folder."""
    km.shutdown_kernel(now=now)
    shutil.rmtree(Path(km.ip).parent, ignore_errors=True)


def kernels_ahead(notebooks: Sequence[Path]) -> Iterator:
    """One started kernel per notebook, each started and given its notebook's imports (`start_kernel`) in the
    background while the previous notebook runs; a kernel is shut down once the caller moves on or stops.

    A warm rerun spends most of its time in kernel start-up and library imports (torch, transformers, sae-lens);
    overlapping them with the previous notebook's work hides nearly all of it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saif-kernel") as starter:
        start_next = (starter.submit(start_kernel, [*LAZY_IMPORTS, *notebook_imports(nb)]) for nb in notebooks)
        pending = next(start_next, None)
        try:
            while pending is not None:
                km = pending.result()
                pending = next(start_next, None)
                try:
                    yield km
                finally:
                    stop_kernel(km)
        finally:
            if pending is not None and pending.exception() is None:  # a failed start already cleaned up after itself
                stop_kernel(pending.result(), now=True)


DETERMINISTIC_STAGES = ("01_sae_loading", "02_feature_discovery", "03_semantic_proximity", "04_causal_ablation",
                        "05_steering_sweeps")
"""Stages whose every table (CSV and parquet: metrics, scores, selections, generations, calibrations) two runs with
the same parameters must write byte for byte (`make check-determinism`); later stages hold paths and run times."""


def deterministic_files(run_dir: Path) -> list[str]:
    """The tables of `DETERMINISTIC_STAGES` in a finished run, as paths relative to `run_dir`."""
    found = sorted(str(path.relative_to(run_dir)) for stage in DETERMINISTIC_STAGES
                   for path in (Path(run_dir) / stage).rglob("*") if path.suffix in (".csv", ".parquet"))
    missing = [stage for stage in DETERMINISTIC_STAGES if not any(f.startswith(stage + "/") for f in found)]
    if missing:
        raise FileNotFoundError(f"{run_dir} has no tables for {missing}: run those notebooks first")
    return found


def differing_cache_entries(first: Path, second: Path) -> list[str]:
    """Cache entries (relative paths) two runs both wrote under the same content key with different bytes: where a
    difference between the runs started. Model weights, Jupyter state and remembered file hashes are not compared."""
    skip = {"models", "jupyter", "file_hashes"}
    found = []
    for path in sorted(Path(first).rglob("*")):
        rel = path.relative_to(first)
        twin = Path(second) / rel
        if rel.parts[0] not in skip and path.is_file() and twin.is_file() and path.read_bytes() != twin.read_bytes():
            found.append(str(rel))
    return found


CREDENTIAL_NAME = re.compile(
    r"(^|_)(api_?key|secret|password|passwd|passphrase|credentials?|private_key)($|_)|(^|_)token$",
    re.IGNORECASE,
)
"""Parameter names that hold credentials (`api_key`, `hf_token`, `db_password`, a bare `token`, …). Counts of tokens
(`max_new_tokens`, `n_ce_tokens`) are not credentials."""

PIPELINE_PARAMETERS = ("profile", "output_dir", "remote")
"""Parameters the pipeline itself passes to every notebook."""


def notebook_parameters(notebook: Path) -> dict[str, object]:
    """The names and default values of a notebook's `parameters` cell (papermill's reading of it)."""
    import papermill

    return {name: spec["default"] for name, spec in papermill.inspect_notebook(str(notebook)).items()}


def check_parameters(extra: dict, notebooks: Sequence[Path] = ()) -> None:
    """Refuse, before any notebook starts, a parameter that holds a credential (keys come from the environment only:
    an executed notebook records every parameter it was given) and a name that is not a parameter of any notebook in
    `notebooks` (papermill would only warn, and the run would silently use the default)."""
    secret = sorted(name for name in extra if CREDENTIAL_NAME.search(name))
    if secret:
        raise ValueError(f"parameters {secret} look like credentials; secrets are never notebook parameters — "
                         f"set them in the environment (e.g. NDIF_API_KEY) instead")
    if not notebooks:
        return
    known = set(PIPELINE_PARAMETERS).union(*(notebook_parameters(nb) for nb in notebooks))
    for name in sorted(set(extra) - known):
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        raise ValueError(f"-p {name}: no notebook of this run ({', '.join(nb.stem for nb in notebooks)}) has a "
                         f"parameter {name!r}" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else
                                                  f"; their parameters: {sorted(known)}"))


def selected_notebooks(only: Sequence[str] | None) -> list[Path]:
    """The numbered notebooks whose names start with one of `only` (None: all); a prefix that matches none, or an
    empty `only`, is refused naming the notebooks there are."""
    notebooks = numbered_notebooks()
    if only is None:
        return notebooks
    available = [nb.stem for nb in notebooks]
    unmatched = [o for o in only if not any(stem.startswith(str(o)) for stem in available)]
    if not only or unmatched:
        raise ValueError(f"--only {' '.join(map(str, only)) or '(nothing)'}: {unmatched or 'no prefix given'} "
                         f"matches no notebook; available: {available} (a prefix such as 05 is enough)")
    return [nb for nb in notebooks if any(nb.stem.startswith(str(o)) for o in only)]


def run_pipeline(profile: str, output_dir: Path | None = None, remote: bool = False, only: list[str] | None = None,
                 extra: dict | None = None) -> pd.DataFrame:
    """Run the numbered notebooks in order, printing one line per notebook; return the per-stage timings."""
    get_profile(profile, remote=remote)  # fail fast on a bad profile before starting any kernel
    if is_profile_file(profile):  # kernels run in the repository root
        profile = str(Path(profile).resolve())
    notebooks = selected_notebooks(only)
    extra = dict(extra or {})
    check_parameters(extra, notebooks)
    # The user's modules and data are checked here, before the first notebook trains or loads anything.
    load_plugins(extra.get("plugins"))
    if extra.get("plugins") is not None:
        extra["plugins"] = plugin_argument(extra["plugins"])
    DataSources(extra.get("instructions_path"), extra.get("content_path"), extra.get("tasks_path")).check()
    output_dir = RunDir.for_profile(profile, output_dir).root
    # A run killed mid-write (SIGKILL, OOM) leaves temporaries; they are never read, but nothing partial should stay.
    for root in (cache_root(), output_dir):
        remove_stale_temporaries(root)
    # Kernels inherit the environment; Jupyter's state lives beside the caches, and the caller's environment is
    # restored when the run ends.
    with scoped_environ(jupyter_env(cache_root() / "jupyter")):
        return _run_notebooks(profile, output_dir, remote, notebooks, extra)


def _run_notebooks(profile: str, output_dir: Path, remote: bool, notebooks: list[Path], extra: dict | None
                   ) -> pd.DataFrame:
    """`run_pipeline` once its environment is set."""
    parameters = {"profile": profile, "output_dir": str(output_dir), "remote": remote} | (extra or {})
    rows = []
    last_seconds = last_timings(output_dir / "timings.csv")
    start_all = time.perf_counter()
    with closing(kernels_ahead(notebooks)) as kernels:
        for i, notebook in enumerate(notebooks, 1):
            start = time.perf_counter()  # includes any wait for this notebook's kernel, so the stages sum to the run
            last = last_seconds.get(notebook.stem)
            print(f"[{i}/{len(notebooks)}] {notebook.stem} …" + (f" (last run {clock(last)})" if last else ""),
                  flush=True)
            km = next(kernels)
            try:
                with LiveStatus(notebook.stem, code_cells(notebook), last) as status:
                    # Each notebook gets the parameters it declares (`check_parameters` refused any that none does).
                    declared = notebook_parameters(notebook)
                    executed = run_notebook(notebook, output_dir, {k: v for k, v in parameters.items() if k in declared},
                                            km=km, status=status)
            except Exception as err:  # papermill's PapermillExecutionError carries the cell; else a setup error
                report_failure(err, notebook, output_dir)
                raise SystemExit(1) from None
            seconds = time.perf_counter() - start
            peak_mb = peak_rss_mb(km.provisioner.pid)
            rows.append({"stage": notebook.stem, "seconds": round(seconds, 1), "peak_rss_mb": peak_mb,
                         "executed_notebook": str(executed)})
            record_timing(output_dir / "timings.csv", rows[-1])  # after each stage: the report (06) reads it
            memory = f", peak memory {peak_mb / 1024:.2f} GB" if peak_mb is not None else ""
            print(f"[{i}/{len(notebooks)}] {notebook.stem} done in {seconds:.1f} s{memory}", flush=True)
    total = time.perf_counter() - start_all
    print(f"all {len(notebooks)} notebooks done in {total:.1f} s → {output_dir}", flush=True)
    return pd.DataFrame(rows)


def last_timings(path: Path) -> dict[str, float]:
    """Stage → seconds from an earlier run's timings.csv (empty when there is none): the live status's estimate."""
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    return dict(zip(table["stage"], table["seconds"].astype(float)))


def report_failure(err: Exception, notebook: Path, output_dir: Path) -> None:
    """Print which cell of which notebook failed, the error, the source line it stopped at, and where things are."""
    cell = getattr(err, "exec_count", None)
    where = output_dir / notebook.stem / notebook.name
    line = failed_line(json.loads(where.read_text())["cells"], getattr(err, "traceback", None)) \
        if where.is_file() else None
    print(f"FAILED {notebook.stem} at cell {cell}: {getattr(err, 'ename', type(err).__name__)}: "
          f"{getattr(err, 'evalue', err)}" + (f"\n  in: {line}" if line else "") +
          f"\n  partially executed notebook: {where}\n  earlier stages' outputs are kept in {output_dir}",
          file=sys.stderr, flush=True)


def peak_rss_mb(pid: int | None) -> float | None:
    """Peak resident memory of a live process in MB (Linux `/proc/<pid>/status` VmHWM); None where it is not reported."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return None
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return round(int(hwm.group(1)) / 1024, 1) if hwm else None


def record_timing(path: Path, row: dict) -> None:
    """Set one stage's row in a run's timings.csv (other stages' rows, e.g. from an earlier `--only` run, are kept)."""
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(row))
    table = pd.concat([table[table["stage"] != row["stage"]], pd.DataFrame([row])], ignore_index=True)
    write_table(table.sort_values("stage").reset_index(drop=True), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="default", help=f"one of {sorted(PROFILES)}, or a .toml/.yaml profile file")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: outputs/<profile>")
    parser.add_argument("--remote", action="store_true", help="run every trace on NDIF (needs NDIF_API_KEY)")
    parser.add_argument("--only", nargs="*", help="run only notebooks whose name starts with these prefixes")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="papermill parameter passed to every notebook, e.g. -p retrain_sae true")
    args = parser.parse_args(argv)
    extra = {name: parse_value(value) for name, value in args.parameter}
    try:
        run_pipeline(args.profile, args.output_dir, args.remote, args.only, extra)
    except (ValueError, ImportError) as err:  # bad arguments or plugins, refused before any notebook starts
        parser.error(str(err))


if __name__ == "__main__":
    main()
