"""One config vocabulary: loading with dotted overrides, renamed fields and dtype names refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from resofilter_jax.configuration import (
    RENAMED,
    ConfigError,
    check_argv,
    check_config,
    check_dtype,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_speaks_the_vocabulary(path: Path) -> None:
    config = load_config(path)  # check_config passes on every shipped recipe
    for old in RENAMED:
        assert old not in config, f"{path.name} still has {old!r}"
    assert config.data.limit == 0
    assert config.model.dtype in ("float32", "bfloat16")


def test_dotted_overrides_are_cast_like_the_command_line() -> None:
    c = load_config(
        ROOT / "configs/sft_smollm2.py",
        {"data.limit": "5", "train.shuffle": "false", "optim.lr": "1e-4", "template": "alpaca"},
    )
    assert (c.data.limit, c.train.shuffle, c.optim.lr, c.template) == (5, False, 1e-4, "alpaca")
    with pytest.raises(ConfigError, match="expected a boolean"):
        load_config(ROOT / "configs/sft_smollm2.py", {"train.shuffle": "maybe"})


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_renamed_fields_are_refused_with_the_new_name(old: str, new: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{old}' was renamed to '{new}'"):
        load_config(ROOT / "configs/ifd_smollm2_sharegpt.py", {old: 3})
    config = load_config(ROOT / "configs/ifd_smollm2_sharegpt.py")
    config[old] = 3  # a config object built in user code
    with pytest.raises(ConfigError, match=rf"--config\.{new}="):
        check_config(config)
    with pytest.raises(SystemExit, match=rf"renamed to '{new}'"):
        check_argv(["--config=x.py", f"--config.{old}=64"])
    check_argv(["--config=x.py", f"--config.{new}=64", "--config.limitless=1"])  # no error


def test_dtype_names_are_canonical() -> None:
    assert check_dtype("bfloat16") == "bfloat16"
    hint = r"model\.dtype must be one of .*\(did you mean 'bfloat16'\?\)"
    with pytest.raises(ConfigError, match=hint):
        load_config(ROOT / "configs/ifd_smollm2_sharegpt.py", {"model.dtype": "bf16"})
    with pytest.raises(ConfigError, match=r"export\.dtype .* got 'half'"):
        load_config(ROOT / "configs/sft_smollm2.py", {"export.dtype": "half"})


def _score_command(*overrides: str) -> subprocess.CompletedProcess:
    config = str(ROOT / "configs/ifd_smollm2_sharegpt.py")
    args = [sys.executable, "-m", "resofilter_jax.score", "--config", config, *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT)


def test_the_command_refuses_an_old_flag_before_parsing() -> None:
    out = _score_command("--config.limit=5")
    assert out.returncode != 0
    assert "'limit' was renamed to 'data.limit'" in out.stderr


def test_the_command_names_the_canonical_dtype_without_a_traceback() -> None:
    out = _score_command("--config.model.dtype=bf16")
    assert out.returncode != 0
    assert "error: model.dtype must be one of" in out.stderr
    assert "did you mean 'bfloat16'" in out.stderr and "Traceback" not in out.stderr
