"""The remote path against a real NDIF: `tools/ndif/ndif.sh` starts a local server (in a network namespace with only
loopback), the tiny profile's model is deployed from its dequantised directory, and the project's nnsight code runs
remotely — results must equal the local ones bit for bit, and the key must not be written anywhere."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import _cache_with_models, copy_run, require

from saif_utils.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "ndif" / "ndif.sh"
SECRET = "ndif-dummy-key-51e0a9c4"
# The headline tables of notebooks 02–05, which the remote run must reproduce: the same tokens, selections and
# accuracies; activations and log-probabilities to float rounding, because a local run shares prompt prefixes through
# a KV cache (a different summation order) and a remote one does not. Notebook 04's latent ablation ships the tiny
# SAE's weights (2.6 MB) with every trace: requests over 1 MiB, which the server takes only with the anyio import
# order tools/ndif/plugin/sitecustomize.py sets up.
HEADLINE_TABLES = ("02_feature_discovery/selected_latents.csv", "02_feature_discovery/robustness.csv",
                   "03_semantic_proximity/proximity.parquet", "04_causal_ablation/ablation.csv",
                   "04_causal_ablation/generations.parquet", "05_steering_sweeps/sweep.parquet",
                   "05_steering_sweeps/results.csv", "05_steering_sweeps/generations.parquet")


@pytest.fixture(scope="module")
def local_ndif(tmp_path_factory, session_models):
    """A running local NDIF serving the tiny profile's model → (environment for clients, model directory)."""
    require(os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("nsenter")),
            "the local NDIF runs in its own network namespace: needs root, unshare and nsenter")
    installed = subprocess.run(["bash", str(SCRIPT), "installed"], capture_output=True, text=True)
    require(installed.returncode == 0, f"no local NDIF server venv ({installed.stderr.strip()}; `make test-deps`)")
    state = Path(tempfile.mkdtemp(prefix="ndif-", dir="/tmp"))  # short: Ray's socket paths live under it
    # The session's dequantised model: the server deploys the very directory the local tiny run loads.
    cache = _cache_with_models(tmp_path_factory.mktemp("ndif-client-cache"), session_models)
    # Two torch threads on both sides: the server computes while the client waits, and equal thread counts give
    # bit-identical results (a matmul's summation order depends on them: 1 vs 2 threads differ by ~1e-4).
    env = os.environ | {"NDIF_STATE": str(state), "SAIF_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "2",
                        "MKL_NUM_THREADS": "2"}
    model_dir = subprocess.run([sys.executable, "-c", "from saif_utils.models import remote_checkpoint; from "
                                "saif_utils.profiles import get_profile; print(remote_checkpoint(get_profile('tiny')"
                                ".model))"], check=True, env=env, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["bash", str(SCRIPT), "up", model_dir], check=True, env=env, timeout=400)
        yield env | {"NDIF_HOST": "http://127.0.0.1:8001", "NDIF_API_KEY": SECRET}, model_dir
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def test_remote_results_equal_local_ones_and_the_key_stays_secret(local_ndif, tmp_path):
    env, model_dir = local_ndif
    out, nnsight_config = tmp_path / "probe.json", tmp_path / "nnsight-config.yaml"
    proc = subprocess.run(["bash", str(SCRIPT), "exec", sys.executable, str(REPO_ROOT / "tests" / "remote_probe.py"),
                           "tiny", str(out)], env=env | {"NNSIGHT_CONFIG": str(nnsight_config)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checkpoint"] == model_dir and model_dir in report["model_key"]
    assert report["server_threads"] == report["client_threads"] == 2, "the fixture gives both sides 2 threads"
    assert all(diff == 0 for diff in report["residual_max_abs_diff"].values()), report["residual_max_abs_diff"]
    assert report["generated_remote"] == report["generated_local"] and report["steering_changed_tokens"]
    assert report["logprob_max_abs_diff"] == 0
    assert report["ablated_remote"] == report["ablated_local"] and report["ablation_changed_tokens"]
    assert report["ablated_logprob_max_abs_diff"] == 0
    assert report["per_row_remote"] == report["per_row_local"] and len(set(map(tuple, report["per_row_local"]))) == 3
    assert report["lens_remote"] == report["lens_local"]
    assert report["calibration_nll_abs_diff"] == 0 and report["calibration_grad_max_abs_diff"] == 0
    assert report["calibration_grad_norm"] > 0
    # sae-lens's forward locally, the same maths as plain tensors remotely (equal to float rounding, see test_interventions)
    assert report["spliced_ce_max_rel_diff"] <= 1e-5 and report["spliced_ce_changes"]
    error = report["server_error"] or ""
    assert "NDIF at http://127.0.0.1:8001 failed while generating (the probe's broken edit)" in error, error
    assert "size of tensor" in error or "must match" in error, f"the server's own error is missing: {error}"
    missing = report["not_deployed_error"] or ""
    assert "has not deployed model key" in missing and "/not/deployed" in missing and "make ndif-up" in missing, missing
    assert SECRET not in proc.stdout + proc.stderr and not nnsight_config.exists()
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the key was written to {leaked}"


def test_the_server_is_reachable_only_from_its_namespace(local_ndif):
    import urllib.error
    import urllib.request

    env, model_dir = local_ndif
    inside = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True)
    assert inside.returncode == 0, inside.stdout + inside.stderr
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen("http://127.0.0.1:8001/connected", timeout=3)
    again = subprocess.run(["bash", str(SCRIPT), "up", model_dir], env=env, capture_output=True, text=True)
    assert "already running" in again.stdout, again.stdout + again.stderr


def test_notebooks_remote_equal_the_local_run_and_write_no_key(local_ndif, tiny_run, session_models, tmp_path):
    """The `make reproduce REMOTE=1` runner on the tiny profile (from the local run's SAEs), every trace on the server,
    with HOME, nnsight's config and the cache in temporary folders: the headline tables equal the local run's, and the
    key is in no file the run could write (those folders, the run folder with its executed notebooks) nor its log."""
    env, _ = local_ndif
    local_dir, run_dir = tiny_run[0], tmp_path / "run"
    copy_run(local_dir, run_dir, ("01_sae_loading",))
    home, cache = tmp_path / "home", _cache_with_models(tmp_path / "cache", session_models)
    home.mkdir()
    run_env = env | {"HOME": str(home), "NNSIGHT_CONFIG": str(tmp_path / "nnsight" / "config.yaml"),
                     "SAIF_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    proc = subprocess.run(["bash", str(SCRIPT), "exec", sys.executable, "-m", "saif_utils.pipeline", "--profile", "tiny",
                           "--remote", "--output-dir", str(run_dir), "--only", "02", "03", "04", "05"],
                          env=run_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in HEADLINE_TABLES:
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        remote, local = read(run_dir / name), read(local_dir / name)
        # Log-prob drops near 0 are differences of float32 means: the server scores rows in other batch layouts (no
        # shared lower blocks), which moves them by ~1e-6 on some CPUs; a real divergence is orders larger.
        pd.testing.assert_frame_equal(remote, local, check_exact=False, rtol=1e-4, atol=1e-5, obj=name)
        # Accuracies and their CIs count whole responses, so they must match exactly; a log-prob's CI is a float.
        exact = [c for c in local if local[c].dtype.kind != "f"
                 or (c.endswith(("_acc", "_ci_low", "_ci_high")) and not c.startswith("logprob"))]
        pd.testing.assert_frame_equal(remote[exact], local[exact], check_exact=True, obj=f"{name} (exact columns)")
    executed = sorted(run_dir.glob("0[2-5]_*/*.ipynb"))
    assert len(executed) == 4 and all('"remote": true' in p.read_text() or "remote = True" in p.read_text()
                                      for p in executed), "the notebooks did not run with remote=True"
    assert SECRET not in proc.stdout + proc.stderr
    leaked = [p for root in (home, cache, tmp_path / "nnsight", run_dir) for p in root.rglob("*")
              if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the key was written to {leaked}"
