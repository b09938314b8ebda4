"""The TFDS reader (extra `tfds`, installed by the `test` extra) on real TFDS files.

Each dataset is a real ``GeneratorBasedBuilder`` prepared with ``download_and_prepare`` into
``tmp_path`` (``array_record`` shards, no network, no TensorFlow), then read back through
``iter_raw_rows(..., reader="tfds")``, the records conversion and the scoring job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from resofilter_jax.configuration import load_config
from resofilter_jax.data import DataError, ReadReport, iter_raw_rows, load_records, to_records
from resofilter_jax.data.readers import detect_reader
from resofilter_jax.scoring.pipeline import run

tfds = pytest.importorskip("tensorflow_datasets")

ROOT = Path(__file__).resolve().parents[1]

ALPACA_ROWS: list[dict[str, Any]] = [
    {"id": "a0", "n": 0, "instruction": "Add 2 and 3.", "input": "", "output": "The sum is 5."},
    {"id": "a1", "n": 1, "instruction": "Translate", "input": "bonjour", "output": "hello"},
    {
        "id": "a2",
        "n": 2,
        "instruction": "Traduis « café » en 中文 😀",
        "input": "naïve straße",
        "output": "咖啡 ✓",
    },
    {"id": "a3", "n": 3, "instruction": "List\ttwo\nlines", "input": "", "output": "one\ntwo"},
    {"id": "a4", "n": 4, "instruction": "Name a colour.", "input": "", "output": "blue"},
    {"id": "a5", "n": 5, "instruction": "Say hi", "input": "politely", "output": "hello there"},
    {"id": "a6", "n": 6, "instruction": "Reverse abc", "input": "", "output": "cba"},
]
ALPACA_TEST_ROWS: list[dict[str, Any]] = [
    {"id": "t0", "n": 100, "instruction": "Only in test", "input": "", "output": "yes"},
    {"id": "t1", "n": 101, "instruction": "Also test", "input": "x", "output": "no"},
    {"id": "t2", "n": 102, "instruction": "Ünïcödé test", "input": "", "output": "ok ✓"},
]
SHAREGPT_ROWS: list[dict[str, Any]] = [
    {
        "id": "c0",
        "conversations": [
            {"from": "human", "value": "Hi, what is 2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "And 3+3?"},
            {"from": "gpt", "value": "6"},
        ],
    },
    {
        "id": "c1",
        "conversations": [
            {"from": "system", "value": "Réponds en français."},
            {"from": "human", "value": "Bonjour « ça va » ? 数据 😀"},
            {"from": "gpt", "value": "Très bien, merci ✓"},
        ],
    },
    {"id": "c2", "conversations": []},
    {"id": "c3", "conversations": [{"from": "gpt", "value": "starts with gpt"}]},
]


class ResoTinyAlpaca(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Alpaca rows (instruction / input / output, a string id and an int) in two splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> Any:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"id": text, "n": np.int64, "instruction": text, "input": text, "output": text}
            ),
            disable_shuffling=True,  # stored in generation order, so row order is checkable
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        return {
            "train": self._generate_examples(ALPACA_ROWS),
            "test": self._generate_examples(ALPACA_TEST_ROWS),
        }

    def _generate_examples(self, rows: list[dict[str, Any]]) -> Any:
        for row in rows:
            yield row["id"], row


class ResoTinyShareGpt(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ShareGPT conversations: a ``Sequence`` of ``{"from", "value"}`` per row."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> Any:
        turn = {"from": tfds.features.Text(), "value": tfds.features.Text()}
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "conversations": tfds.features.Sequence(turn)}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Any:
        for row in SHAREGPT_ROWS:
            yield row["id"], row


def _prepare(builder_cls: type, data_dir: Path, num_shards: int) -> Path:
    """Builds the dataset under ``data_dir``; returns its DATA_DIR/NAME/VERSION directory."""
    builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=num_shards)
    )
    return Path(builder.data_path)


@pytest.fixture(scope="module")
def alpaca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tfds.disable_progress_bar()
    return _prepare(ResoTinyAlpaca, tmp_path_factory.mktemp("tfds"), num_shards=3)


@pytest.fixture(scope="module")
def sharegpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tfds.disable_progress_bar()
    return _prepare(ResoTinyShareGpt, tmp_path_factory.mktemp("tfds"), num_shards=1)


def test_dataset_is_real_tfds_files(alpaca_dir: Path) -> None:
    names = sorted(p.name for p in alpaca_dir.iterdir())
    assert {"dataset_info.json", "features.json"} <= set(names)
    shards = [n for n in names if n.startswith("reso_tiny_alpaca-train.array_record-")]
    assert len(shards) == 3  # the order check below crosses shard boundaries
    info = json.loads((alpaca_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    assert detect_reader(alpaca_dir) == "tfds"  # reader="auto" picks it from features.json


def test_reads_every_field_of_every_row_in_order(alpaca_dir: Path) -> None:
    report = ReadReport()
    got = list(iter_raw_rows(alpaca_dir, reader="tfds", report=report))
    assert got == list(enumerate(ALPACA_ROWS))  # values, types (str / int) and order
    assert all(type(r["n"]) is int and type(r["instruction"]) is str for _, r in got)
    assert report.rows_read == len(ALPACA_ROWS) and report.errors == 0
    assert report.path == str(alpaca_dir)


def test_split_slice_and_shard(alpaca_dir: Path) -> None:
    assert list(iter_raw_rows(alpaca_dir, reader="tfds", split="test")) == list(
        enumerate(ALPACA_TEST_ROWS)
    )
    assert list(iter_raw_rows(alpaca_dir, reader="tfds", split="train[2:5]")) == list(
        enumerate(ALPACA_ROWS[2:5])
    )
    got = list(iter_raw_rows(alpaca_dir, reader="tfds", shard=(1, 3)))
    assert got == [(n, ALPACA_ROWS[n]) for n in (1, 4)]
    with pytest.raises(ValueError, match="valid"):
        list(iter_raw_rows(alpaca_dir, reader="tfds", split="valid"))


def test_dataset_name_with_data_dir_kwarg(alpaca_dir: Path) -> None:
    """A dataset name plus ``data_dir=`` (passed through): found from its prepared files."""
    data_dir = alpaca_dir.parents[1]
    got = list(iter_raw_rows("reso_tiny_alpaca", reader="tfds", data_dir=str(data_dir)))
    assert got == list(enumerate(ALPACA_ROWS))
    got = list(
        iter_raw_rows("reso_tiny_alpaca:1.0.0", reader="tfds", split="test", data_dir=str(data_dir))
    )
    assert got == list(enumerate(ALPACA_TEST_ROWS))


def test_directory_without_dataset_info_is_an_error(alpaca_dir: Path) -> None:
    with pytest.raises(DataError, match="DATA_DIR/NAME/VERSION"):
        list(iter_raw_rows(alpaca_dir.parent, reader="tfds"))  # DATA_DIR/NAME: no version


def test_alpaca_records(alpaca_dir: Path) -> None:
    records = list(to_records(iter_raw_rows(alpaca_dir, reader="tfds"), "alpaca"))
    assert [r.index for r in records] == list(range(len(ALPACA_ROWS)))
    assert [(r.id, r.instruction, r.input, r.output) for r in records] == [
        (r["id"], r["instruction"], r["input"], r["output"]) for r in ALPACA_ROWS
    ]
    assert all(r.ok for r in records)
    auto, report = load_records(alpaca_dir, reader="tfds", split="test")  # format detected
    assert [(r.id, r.instruction, r.output) for r in auto] == [
        (r["id"], r["instruction"], r["output"]) for r in ALPACA_TEST_ROWS
    ]
    assert report.rows_read == len(ALPACA_TEST_ROWS)


def test_sharegpt_conversations_come_back_as_lists_of_turns(sharegpt_dir: Path) -> None:
    # TFDS stores a Sequence of dicts as a dict of lists; the reader gives the turns back.
    assert list(iter_raw_rows(sharegpt_dir, reader="tfds")) == list(enumerate(SHAREGPT_ROWS))

    first = list(to_records(iter_raw_rows(sharegpt_dir, reader="tfds"), "sharegpt"))
    assert [(r.index, r.id, r.status) for r in first] == [
        (0, "c0", "ok"),
        (1, "c1", "ok"),
        (2, "c2", "error:no_human_gpt_pair"),
        (3, "c3", "error:no_human_gpt_pair"),
    ]
    assert (first[0].instruction, first[0].output) == ("Hi, what is 2+2?", "4")
    assert first[1].system == "Réponds en français."
    assert (first[1].instruction, first[1].output) == (
        "Bonjour « ça va » ? 数据 😀",
        "Très bien, merci ✓",
    )

    every = list(
        to_records(iter_raw_rows(sharegpt_dir, reader="tfds"), "auto", sharegpt_turns="all")
    )
    assert [(r.index, r.turn, r.instruction, r.output) for r in every if r.ok] == [
        (0, 0, "Hi, what is 2+2?", "4"),
        (0, 1, "And 3+3?", "6"),
        (1, 0, "Bonjour « ça va » ? 数据 😀", "Très bien, merci ✓"),
    ]


# ------------------------------------------------------------------ the scoring job


def _config(model_dir: Path, data: Path | str, out: Path, **data_over: Any) -> Any:
    """configs/ifd_gpt2_alpaca.py shrunk for the tiny model, reading ``data`` with TFDS."""
    return load_config(
        ROOT / "configs/ifd_gpt2_alpaca.py",
        {
            "model.path": str(model_dir),
            "data.path": str(data),
            "data.reader": "tfds",
            "data.split": "train",
            **{f"data.{k}": v for k, v in data_over.items()},
            "output_dir": str(out),
            "max_length": 48,
            "min_bucket": 16,
            "token_budget": 256,
            "shard_size": 4,  # two shards for seven rows
            "progress": False,
            "compilation_cache_dir": "",
        },
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from support.data import build_tokenizer
    from support.models import save_tiny_model

    path = tmp_path_factory.mktemp("tiny_gpt2") / "gpt2"
    save_tiny_model("gpt2", build_tokenizer("none"), path)
    return path


def test_score_job_on_tfds_directory(model_dir: Path, alpaca_dir: Path, tmp_path: Path) -> None:
    summary = run(_config(model_dir, alpaca_dir, tmp_path / "tfds"))
    out = tmp_path / "tfds"
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(ALPACA_ROWS)))
    assert [r["id"] for r in rows] == [r["id"] for r in ALPACA_ROWS]
    assert [r["status"] for r in rows] == ["ok"] * len(ALPACA_ROWS)
    assert all(np.isfinite(r["ifd"]) and r["n_tokens_direct"] > 0 for r in rows)
    assert summary["rows"] == len(ALPACA_ROWS) and summary["statuses"] == {"ok": len(rows)}
    assert pq.read_table(out / "scores.parquet").num_rows == len(ALPACA_ROWS)
    report = json.loads((out / "run.json").read_text())["read_report"]
    assert report["rows_read"] == len(ALPACA_ROWS) and report["path"] == str(alpaca_dir)

    # The same rows from a JSON Lines file score the same: the reader changed nothing.
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA_ROWS))
    run(_config(model_dir, jsonl, tmp_path / "jsonl", reader="jsonl", split=""))
    want = [json.loads(line) for line in (tmp_path / "jsonl/scores.jsonl").read_text().splitlines()]
    for got, ref in zip(rows, want, strict=True):
        assert got["status"] == ref["status"] and got["id"] == ref["id"]
        np.testing.assert_allclose(got["ifd"], ref["ifd"], rtol=1e-6, err_msg=got["id"])
