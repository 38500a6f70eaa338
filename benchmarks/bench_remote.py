"""Remote (a local NDIF) vs local time of the default profile's two kinds of work, through the same functions: one
discovery read batch (residuals at every SAE layer, last prompt token) and one steered generation batch (a vector on
every token, a fixed number of new tokens). Median of 3 rounds after a warm-up, interleaved.

`make bench` runs it as root: it starts the local NDIF (`tools/ndif/ndif.sh`, loopback-only namespace), re-runs
itself inside that namespace to measure, and stops the server — unless one was already running, which it leaves up.
Without root or `unshare` it prints one line saying why and measures nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from common import content_prompts, median_seconds, report

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "ndif" / "ndif.sh"
INSIDE = "_SAIF_BENCH_IN_NDIF"
N_NEW = 32


def measure() -> None:
    """The measurement itself (inside the server's namespace; NDIF_HOST / NDIF_API_KEY set)."""
    from saif_utils.generation import generate_steered
    from saif_utils.models import load_model, read_residual
    from saif_utils.profiles import get_profile

    profile = get_profile("default")
    local, remote = load_model(profile), load_model(get_profile("default", remote=True))
    ids = content_prompts(local.tokenizer, profile.batch_size)
    layers, steer_layer = list(profile.sae_layers), profile.sae_layers[1]
    vector = torch.randn(local.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 40

    def read(model, is_remote):
        return lambda: read_residual(model, ids, layers, "last", len(ids), remote=is_remote)

    def steer(model, is_remote):
        return lambda: generate_steered(model, ids, steer_layer, vector, N_NEW, batch_size=len(ids), remote=is_remote,
                                        min_new_tokens=N_NEW)

    times = median_seconds({"read_local": read(local, False), "read_remote": read(remote, True),
                            "generate_local": steer(local, False), "generate_remote": steer(remote, True)}, repeats=3)
    report("remote", {f"{k}_s": v for k, v in times.items()} | {
        "rows_per_batch": len(ids), "new_tokens": N_NEW,
        "read_remote_over_local": times["read_remote"] / times["read_local"],
        "generate_remote_over_local": times["generate_remote"] / times["generate_local"]})


def main() -> None:
    if os.environ.get(INSIDE):
        measure()
        return
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("bench_remote: skipped — the local NDIF runs in its own network namespace, which needs root and unshare")
        return
    from saif_utils.models import remote_checkpoint
    from saif_utils.profiles import get_profile

    running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    subprocess.run(["bash", str(SCRIPT), "install"], check=True)
    # Server and client both compute on ndif.sh's default thread count (every core), as `make ndif-up` users get.
    subprocess.run(["bash", str(SCRIPT), "up", remote_checkpoint(get_profile("default").model)], check=True)
    try:
        env = os.environ | {INSIDE: "1", "NDIF_HOST": "http://127.0.0.1:8001",
                            "NDIF_API_KEY": os.environ.get("NDIF_API_KEY", "local")}
        subprocess.run(["bash", str(SCRIPT), "exec", sys.executable, __file__], check=True, env=env)
    finally:
        if not running:
            subprocess.run(["bash", str(SCRIPT), "down"], check=False)


if __name__ == "__main__":
    main()
