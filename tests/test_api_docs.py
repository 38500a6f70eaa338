"""The examples of docs/api.md run as written, in order, on the tiny profile."""
from __future__ import annotations

import re

from saif_utils.paths import REPO_ROOT
from saif_utils.pipeline import scoped_environ


def test_the_api_examples_run(tiny_run):
    """Every ```python block of docs/api.md, one namespace, on the tiny run's cache (its SAEs are trained there)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "docs" / "api.md").read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5, "docs/api.md lost its examples"
    namespace: dict = {}
    with scoped_environ({"SAIF_CACHE_DIR": str(tiny_run[2])}):
        for block in blocks:
            exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    verdicts, steered, plain = namespace["verdicts"], namespace["steered"], namespace["plain"]
    assert list(verdicts["response"]) == steered and len(steered) == 2
    assert steered != plain, "the steering vector changed no answer"
    assert {"strict", "loose", "degenerate", "checker_strict"} <= set(verdicts.columns)
