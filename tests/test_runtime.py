"""Process set-up: the allocator settings of the commands (glibc mallopt), versions, cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = (
    "from resofilter_jax.runtime import tune_allocator; "
    "a = tune_allocator(); b = tune_allocator(); print(a, b)"
)


def _run(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CODE], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_applies_once_and_can_be_disabled() -> None:
    assert _run({"RESOFILTER_MALLOC_TUNING": "1"}) == "True True"
    assert _run({"RESOFILTER_MALLOC_TUNING": "0"}) == "False False"


def test_score_entry_point_tunes_the_allocator() -> None:
    import inspect

    from resofilter_jax import evaluate, score, train

    for module in (score, train, evaluate):
        assert "tune_allocator()" in inspect.getsource(module.main), module.__name__
