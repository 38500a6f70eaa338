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

import pytest

from saif_utils.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "ndif" / "ndif.sh"
CAN_RUN = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("nsenter")
pytestmark = pytest.mark.skipif(not CAN_RUN, reason="the local NDIF runs in its own network namespace: needs root and "
                                                    "unshare (CI has both)")
SECRET = "ndif-dummy-key-51e0a9c4"


@pytest.fixture(scope="module")
def local_ndif(tmp_path_factory):
    """A running local NDIF serving the tiny profile's model → (environment for clients, model directory)."""
    state = Path(tempfile.mkdtemp(prefix="ndif-", dir="/tmp"))  # short: Ray's socket paths live under it
    cache = tmp_path_factory.mktemp("ndif-client-cache")
    env = os.environ | {"NDIF_STATE": str(state), "SAIF_CACHE_DIR": str(cache)}
    subprocess.run(["bash", str(SCRIPT), "install"], check=True, env=env, timeout=900)
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
    assert all(diff == 0 for diff in report["residual_max_abs_diff"].values()), report["residual_max_abs_diff"]
    assert report["generated_remote"] == report["generated_local"] and report["steering_changed_tokens"]
    assert report["logprob_max_abs_diff"] == 0
    assert report["ablated_remote"] == report["ablated_local"] and report["ablation_changed_tokens"]
    assert report["ablated_logprob_max_abs_diff"] == 0
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
