"""The Hugging Face `datasets` reader (extra `hf`) on local data: save_to_disk dirs and builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resofilter_jax.data import DataError, load_records

datasets = pytest.importorskip("datasets")

ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate", "input": "bonjour", "output": "hello"},
    {"instruction": "Missing output", "input": ""},
]


def _rows_with_none() -> list[dict]:
    return [{**r, "output": r.get("output")} for r in ROWS]


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    datasets.Dataset.from_list(_rows_with_none()).save_to_disk(str(tmp_path / "ds"))
    records, report = load_records(tmp_path / "ds", "alpaca", on_error="status")
    assert [r.index for r in records] == [0, 1, 2]
    assert records[1].input == "bonjour" and records[1].output == "hello"
    assert records[2].status.startswith("error:")  # null output -> a status row, not dropped


def test_save_to_disk_dataset_dict_needs_a_split(tmp_path: Path) -> None:
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:2]), test=datasets.Dataset.from_list(ROWS[:1])
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="pass split="):
        load_records(tmp_path / "dd", "alpaca")
    records, _ = load_records(tmp_path / "dd", "alpaca", split="test")
    assert len(records) == 1 and records[0].output == "5"
    with pytest.raises(DataError, match="no split 'valid'"):
        load_records(tmp_path / "dd", "alpaca", split="valid")


def test_named_builder_with_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    records, _ = load_records(
        "json",
        "alpaca",
        reader="hf",
        split="train",
        data_files=str(src),
        cache_dir=str(tmp_path / "cache"),
    )
    assert [r.output for r in records] == ["5", "hello"]
