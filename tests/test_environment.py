"""The lock, environment.yml, requirements.in and pyproject pin the same versions."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    out = {}
    for line in lines:
        match = re.match(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            out[match.group(1).lower().replace("_", "-")] = match.group(2)
    return out


def test_environment_yml_pins_match_the_lock():
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    env = _pins((ROOT / "environment.yml").read_text().splitlines())
    assert lock and env == lock
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_direct_pins_agree_with_the_lock():
    lock = _pins((ROOT / "requirements.lock").read_text().splitlines())
    direct = _pins((ROOT / "requirements.in").read_text().splitlines())
    pyproject = _pins(re.findall(r'"([^"]+==[^"]+)"', (ROOT / "pyproject.toml").read_text()))
    for name, version in {**direct, **pyproject}.items():
        assert lock.get(name) == version, f"{name}: pinned {version}, locked {lock.get(name)}"
    assert lock["torch"] == "2.13.0"
    assert (ROOT / "constraints.txt").read_text().strip() == "torch==2.13.0"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
