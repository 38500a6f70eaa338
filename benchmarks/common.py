"""Shared benchmark helpers: the default model, a fixed prompt set, and median-of-N timing after a warm-up."""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds after `warmup` untimed ones. Rounds interleave the
    functions (A B C, A B C, …) so that drift in machine load hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def default_model():
    """The default profile's model (SmolLM2-135M-Instruct from its GGUF)."""
    from saif_utils.models import load_model
    from saif_utils.profiles import get_profile

    profile = get_profile("default")
    return profile, load_model(profile)


def content_prompts(tokenizer, n: int, split: str = "val") -> list[list[int]]:
    """Token ids of `n` content-only chat prompts from the repository's passages."""
    from saif_utils.data import evaluation_prompts, load_passages

    passages = load_passages()
    return list(evaluation_prompts(tokenizer, passages[passages["split"] == split].head(n))["input_ids"])


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far in MB (Linux VmHWM); None where /proc does not report it."""
    from saif_utils.pipeline import peak_rss_mb as process_peak_mb

    return process_peak_mb(os.getpid())


def report(name: str, figures: dict) -> None:
    """Print the figures and the benchmark process's own peak resident memory as aligned lines, then one JSON line."""
    figures = figures | {"process_peak_rss_mb": peak_rss_mb()}
    for key, value in figures.items():
        print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
    print(json.dumps({"benchmark": name, **figures}))
