# The README's promises about set-up: its two commands, and CI running the second.
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if line.startswith("    ") and line.strip()]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = _commands()[1]
    assert test_command in [line.strip() for line in ci]


def test_readme_first_command_runs_the_default_config() -> None:
    run_command = _commands()[0]
    assert "pip install" in run_command and run_command.endswith("mirrorgate run")
    assert (ROOT / "mirrorgate.toml").is_file()
