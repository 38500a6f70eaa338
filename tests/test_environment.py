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


def readme_commands() -> dict[str, str]:
    """The README's two commands (its first bash block, under "The two commands"), by what they do."""
    block = re.search(r"## The two commands\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README has no bash block under '## The two commands'"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    assert len(commands) == 2, commands
    return {"reproduce": commands[0], "test": commands[1]}


def ci_commands(script: str) -> list[str]:
    """The commands a shell script runs: its lines less comments, blank lines and shell set-up (set, cd, export)."""
    lines = [line.split("#")[0].strip() for line in script.splitlines()]
    return [line for line in lines if line and not re.match(r"(set|cd|export)\b", line)]


def test_ci_runs_exactly_the_readme_test_command():
    assert readme_commands()["test"] == "make test"
    assert ci_commands((ROOT / ".ci" / "run").read_text()) == [readme_commands()["test"]]
    # what counts as a command: a commented-out or extra line is seen
    assert ci_commands("set -e\ncd x\n# make test\necho hi\n") == ["echo hi"]
    assert ci_commands("make test # runs\nmake bench\n") == ["make test", "make bench"]


def test_ruff_is_configured_and_run_by_make_test():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'select = \["F", "B", "UP", "I"\]', pyproject) and "line-length = 120" in pyproject
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\blint\b", makefile, re.M) and "$(BIN)/ruff check ." in makefile
