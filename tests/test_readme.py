"""README promises: it opens with the two commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_opens_with_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    cmds = _commands()
    assert len(cmds) >= 2
    head = text.split("## ")[0]
    assert head.count("```bash") == 2, "the two commands come first"
    assert "resofilter_jax" in cmds[0] and "--config configs/" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command() -> None:
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_default_config_file_exists() -> None:
    cfg = re.search(r"--config (configs/\S+\.py)", _commands()[0]).group(1)
    assert (ROOT / cfg).is_file()
