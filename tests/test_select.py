"""Selection: the Superfiltering and ResoFilter policies, output files and formats, the main."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.selection import FEATURE, RESO_STATUS, jsonl, reso_inputs, write_inputs

from resofilter_jax.selection.pipeline import SelectConfig, run
from resofilter_jax.selection.policies import (
    detect_policy,
    resofilter_select,
    superfiltering_select,
)
from resofilter_jax.selection.rows import (
    embedding_model,
    kept_label,
    rate_output_path,
)

ROOT = Path(__file__).resolve().parents[1]


def test_policy_threshold_order_ties_and_k() -> None:
    ifd = [0.5, None, 0.9, 1.0, 0.9, float("nan"), 0.2, 1.5, 0.95, 0.7]
    # 10 rows -> k = floor(0.3 * 10) = 3 of the eligible (< 1.0) ones, by IFD descending,
    # the tie at 0.9 broken by the lower position.
    assert superfiltering_select(ifd, rate=0.3).tolist() == [8, 2, 4]
    assert superfiltering_select(ifd, rate=0.3, threshold=1.01).tolist() == [3, 8, 2]
    assert superfiltering_select(ifd, rate=0.0, count=5).tolist() == [8, 2, 4, 9, 0]
    assert superfiltering_select(ifd, rate=1.0).tolist() == [8, 2, 4, 9, 0, 6]  # all eligible


def test_k_is_relative_to_this_dataset_not_52002() -> None:
    rng = np.random.default_rng(0)
    ifd = rng.uniform(0.1, 0.99, size=1234)
    assert len(superfiltering_select(ifd, rate=0.05)) == math.floor(0.05 * 1234)


def test_run_writes_input_rows_with_scores(tmp_path: Path) -> None:
    data, scores = write_inputs(tmp_path)
    summary = run(
        SelectConfig(
            scores=str(scores), data=str(data), rate=0.5, output=str(tmp_path / "sel.json")
        )
    )
    assert summary == {
        "rows": 6,
        "eligible": 4,
        "selected": 3,
        "output": str(tmp_path / "sel.json"),
    }
    rows = json.loads((tmp_path / "sel.json").read_text())
    assert [r["extra"] for r in rows] == [3, 5, 0]  # IFD 0.9, 0.85, 0.8
    assert rows[0]["instruction"] == "task 3" and rows[0]["ifd"] == pytest.approx(0.9)

    run(
        SelectConfig(
            scores=str(scores),
            data=str(data),
            rate=0.5,
            order="original",
            output=str(tmp_path / "sel.jsonl"),
        )
    )
    lines = [json.loads(x) for x in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert [r["extra"] for r in lines] == [0, 3, 5]


def test_wrong_data_file_is_refused(tmp_path: Path) -> None:
    _, scores = write_inputs(tmp_path)
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    with pytest.raises(ValueError, match="not in"):
        run(
            SelectConfig(
                scores=str(scores), data=str(short), rate=0.5, output=str(tmp_path / "o.jsonl")
            )
        )


# --- ResoFilter policy -------------------------------------------------------------------------


def test_policy_detection_and_errors(tmp_path: Path) -> None:
    data, scores = reso_inputs(tmp_path)
    out = str(tmp_path / "o.jsonl")
    base = SelectConfig(scores=str(scores), data=str(data), output=out)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"drop rates must be in \[0, 1\)"):
            run(dataclasses.replace(base, drop_rate=bad))
        with pytest.raises(ValueError, match=r"drop rates must be in \[0, 1\)"):
            run(dataclasses.replace(base, drop_rates=(0.5, bad)))
    with pytest.raises(ValueError, match="must differ"):
        run(dataclasses.replace(base, drop_rates=(0.5, 0.5)))
    with pytest.raises(ValueError, match="keep must be"):
        run(dataclasses.replace(base, keep="middle"))
    with pytest.raises(ValueError, match="no `ifd` column"):
        run(dataclasses.replace(base, policy="superfiltering"))
    with pytest.raises(ValueError, match="needs --data"):
        run(dataclasses.replace(base, data="", format="reference"))
    with pytest.raises(ValueError, match="--format rows only"):
        run(dataclasses.replace(base, format="reference", with_features=True))
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(ValueError, match="is it the file that was scored"):
        run(dataclasses.replace(base, data=str(short), format="reference"))
    assert not Path(out).exists()

    neither = tmp_path / "neither.jsonl"
    neither.write_text(json.dumps({"index": 0, "status": "ok", "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="neither an `ifd`"):
        run(SelectConfig(scores=str(neither), output=out))
    with pytest.raises(ValueError, match="no `score` column"):
        run(SelectConfig(scores=str(neither), output=out, policy="resofilter"))
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"index": 0, "status": "ok", "ifd": 0.5, "score": 1.0}) + "\n")
    with pytest.raises(ValueError, match="both `ifd` and `score`"):
        run(SelectConfig(scores=str(both), output=out))
    summary = run(SelectConfig(scores=str(both), output=out, policy="resofilter", drop_rate=0.0))
    assert summary["outputs"][0]["selected"] == 1
    assert detect_policy(["index", "ifd"]) == "superfiltering"
    assert detect_policy(["index", "score", FEATURE]) == "resofilter"
    _, ifd_scores = write_inputs(tmp_path)
    assert "eligible" in run(SelectConfig(scores=str(ifd_scores), output=out, rate=0.5))


def test_kept_labels_and_paths() -> None:
    assert [kept_label(p) for p in (0.25, 0.5, 0.75, 0.9, 0.0, 0.125)] == [
        "p75",
        "p50",
        "p25",
        "p10",
        "p100",
        "p87_5",
    ]
    assert rate_output_path("out/sel.jsonl", 0.25) == Path("out/sel.p75.jsonl")
    assert rate_output_path("sel.json", 0.9) == Path("sel.p10.json")


def test_absl_main_subprocess(tmp_path: Path) -> None:
    data, scores = reso_inputs(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "resofilter_jax.select",
        f"--scores={scores}",
        f"--data={data}",
        "--drop_rates=0.25,0.5,0.75",
        "--format=reference",
        f"--output={tmp_path / 'sel.jsonl'}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [(o["kept"], o["selected"]) for o in summary["outputs"]] == [
        ("p75", 6),
        ("p50", 4),
        ("p25", 2),
    ]
    assert [r["idx"] for r in jsonl(tmp_path / "sel.p25.jsonl")] == [4, 7]
    bad = subprocess.run(
        [*cmd[:-2], "--drop_rates=0.5,1.2", f"--output={tmp_path / 'x.jsonl'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode != 0 and "drop rates must be in [0, 1)" in bad.stderr


# --- Superfiltering.D -------------------------------------------------------------------------


def test_diversity_flags_are_validated_before_any_model(tmp_path: Path) -> None:
    data, scores = write_inputs(tmp_path)  # 6 rows, 4 with IFD < 1
    out = tmp_path / "o.json"
    base = SelectConfig(scores=str(scores), data=str(data), output=str(out), fla_num=2)
    bad = [
        ({"ifd_num": 1}, r"--fla_num=2 is more than --ifd_num=1"),
        ({"fla_num": 0, "ifd_num": 3}, "set --fla_num too"),
        ({"ifd_num": 3, "count": 3}, "both size the IFD stage"),
        ({"fla_num": -1}, ">= 0"),
        ({"ifd_num": -2}, ">= 0"),
        ({"fla_metric": "dot"}, "fla_metric must be one of"),
        ({"fla_ties": "random"}, "fla_ties must be one of"),
        ({"embed_type": "query"}, "embed_type must be one of"),
        ({"token_budget": 0}, "token_budget"),
        ({"data": ""}, "needs --data"),
        ({"fla_num": 4, "rate": 0.5}, "4 is more than the 3 rows of the IFD stage"),
        ({"fla_num": 5, "ifd_num": 6}, "5 is more than the 4 rows of the IFD stage"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            run(dataclasses.replace(base, **change))
    (tmp_path / "reso").mkdir()
    _, reso_scores = reso_inputs(tmp_path / "reso")
    for change in ({"fla_num": 2}, {"fla_num": 0, "ifd_num": 4}):
        with pytest.raises(ValueError, match="superfiltering policy only"):
            run(dataclasses.replace(base, scores=str(reso_scores), **change))
    assert not out.exists()
    # The flags reach the config (main maps every flag onto the field of the same name).
    cmd = [sys.executable, "-m", "resofilter_jax.select", f"--scores={scores}", f"--data={data}"]
    done = subprocess.run(
        [*cmd, "--fla_num=3", "--ifd_num=2", f"--output={out}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode != 0 and "--fla_num=3 is more than --ifd_num=2" in done.stderr
    assert not out.exists()
    # the policies keep jax out of their imports with copies of these choices: they must agree.
    from resofilter_jax.selection import embeddings, policies
    from resofilter_jax.selection import facility_location as diversity

    assert policies.FLA_METRICS == diversity.METRICS and policies.FLA_TIES == diversity.TIES
    assert policies.EMBED_TYPES == embeddings.EMB_TYPES


def test_embedding_model_resolution(tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    cfg = {"model": {"path": str(gguf), "dtype": "bfloat16"}, "max_length": 512}
    (tmp_path / "run_config.json").write_text(json.dumps(cfg))
    assert embedding_model(scores) == {
        "model_path": str(gguf),
        "dtype": "bfloat16",
        "param_dtype": "bfloat16",
        "matmul_precision": "default",
        "max_length": 512,
    }
    got = embedding_model(scores, model="other/model", dtype="float32", max_length=64)
    assert got == {
        "model_path": "other/model",
        "dtype": "float32",
        "param_dtype": "float32",
        "matmul_precision": "highest",  # none recorded: fp32 compute means fp32
        "max_length": 64,
    }
    gguf.unlink()
    with pytest.raises(ValueError, match="does not exist any more: pass --model"):
        embedding_model(scores)


def _sharegpt_subset(source: Path, dest: Path, n: int) -> list:
    """The first ``n`` ShareGPT rows that make ok records, written to ``dest``; their records."""
    from resofilter_jax.data import iter_raw_rows, to_records

    raw, records = [], []
    rows = iter_raw_rows(source, on_error="status", allow_truncated=True)
    for number, row in itertools.islice(rows, 200):
        recs = list(to_records([(number, row)], "sharegpt", on_error="status"))
        if isinstance(row, dict) and recs and recs[0].ok and recs[0].output:
            raw.append(row)
            records.append(recs[0])
        if len(raw) == n:
            break
    dest.write_text(json.dumps(raw))
    return records


def test_superfiltering_d_end_to_end_on_smollm2(
    tmp_path: Path, smollm2_gguf: Path, sharegpt_path: Path
) -> None:
    """select --fla_num picks what superfiltering_d picks on embed_texts of the same texts."""
    import jax

    from resofilter_jax.parallel import make_mesh
    from resofilter_jax.selection import facility_location as dv
    from resofilter_jax.selection.diversity import superfiltering_d
    from resofilter_jax.selection.embeddings import cached_model, embed_texts

    n = 24
    data = tmp_path / "share.json"
    records = _sharegpt_subset(sharegpt_path, data, n)
    assert len(records) == n
    ids = [r.id for r in records]
    assert len(set(ids)) == n  # rows come back as the input's own rows: found by id
    rng = np.random.default_rng(3)
    ifd = rng.uniform(0.3, 1.2, size=n)
    ifd[[2, 9]] = np.nan
    ifd[5] = ifd[17] = 0.77  # a tie inside the IFD stage: 5 first
    out_dir = tmp_path / "ifd"
    out_dir.mkdir()
    pq.write_table(
        pa.table({"index": list(range(n)), "status": ["ok"] * n, "ifd": ifd}),
        out_dir / "scores.parquet",
    )
    (out_dir / "run_config.json").write_text(
        json.dumps(
            {
                "method": "ifd",
                "model": {"path": str(smollm2_gguf), "dtype": "float32"},
                "data": {"format": "sharegpt", "fields": {}, "sharegpt_turns": "first"},
                "max_length": 64,
            }
        )
    )
    # 1 bucket (64) and batches of 8 rows over 2 devices: one compiled shape throughout.
    budget = 8 * 64
    base = SelectConfig(
        scores=str(out_dir / "scores.parquet"),
        data=str(data),
        output=str(tmp_path / "d.jsonl"),
        fla_num=4,
        ifd_num=8,
        token_budget=budget,
        num_devices=2,
    )
    summary = run(base)  # the model and max_length come from run_config.json
    lm = cached_model(str(smollm2_gguf))  # the model select loaded (saves a second load)

    mesh = make_mesh(jax.devices()[:2])
    seen: dict[tuple[int, ...], np.ndarray] = {}

    def embed(positions: np.ndarray) -> np.ndarray:
        # The reference's text: instruction, input line (empty for ShareGPT), output.
        texts = [
            f"{records[i].instruction}\n{records[i].input}\n{records[i].output}" for i in positions
        ]
        emb = embed_texts(
            lm.model, lm.tokenizer, texts, max_length=64, token_budget=budget, mesh=mesh
        )
        seen[tuple(positions.tolist())] = emb
        return emb

    top = superfiltering_select(ifd, rate=0.0, count=8)
    assert len(top) == 8 and list(top).index(5) < list(top).index(17)
    want = superfiltering_d(top, embed, ifd_num=8, fla_num=4)
    rows = jsonl(tmp_path / "d.jsonl")
    got = [ids.index(r["id"]) for r in rows]
    assert got == want.tolist()  # greedy order by default
    assert set(got) <= set(top.tolist()) and got != sorted(got)
    assert [r["fla_rank"] for r in rows] == list(range(4))
    assert [r["ifd"] for r in rows] == pytest.approx(ifd[got].tolist())
    assert rows[0]["conversations"] == json.loads(data.read_text())[got[0]]["conversations"]
    kernel = dv.SimilarityKernel(seen[tuple(top.tolist())])
    rank = {int(p): i for i, p in enumerate(top)}
    objective = dv.facility_location_value(kernel, [rank[p] for p in got])
    assert summary["objective"] == pytest.approx(objective, abs=1e-9) and objective > 0
    assert {k: summary[k] for k in ("rows", "eligible", "selected", "ifd_num", "fla_num")} == {
        "rows": n,
        "eligible": int(np.sum(ifd < 1.0)),
        "selected": 4,
        "ifd_num": 8,
        "fla_num": 4,
    }
    assert summary["model"] == str(smollm2_gguf) and summary["max_length"] == 64
    assert summary["fla_metric"] == "euclidean" and summary["fla_ties"] == "low"
    assert set(summary["seconds"]) == {"load_model", "embedding", "greedy"}

    # --order original: the same picks in input order, fla_rank still the greedy position.
    run(dataclasses.replace(base, order="original"))
    rows = jsonl(tmp_path / "d.jsonl")
    assert [ids.index(r["id"]) for r in rows] == sorted(got)
    assert [r["fla_rank"] for r in rows] == [got.index(i) for i in sorted(got)]
    # --order score: IFD order.
    run(dataclasses.replace(base, order="score"))
    assert [ids.index(r["id"]) for r in jsonl(tmp_path / "d.jsonl")] == [
        i for i in top.tolist() if i in got
    ]

    # --ifd_num 0: the IFD stage is what --rate keeps (floor(0.25 x 24) = 6 rows).
    summary = run(dataclasses.replace(base, ifd_num=0, rate=0.25, fla_num=3))
    stage = superfiltering_select(ifd, rate=0.25)
    assert summary["ifd_num"] == len(stage) == 6
    got = [ids.index(r["id"]) for r in jsonl(tmp_path / "d.jsonl")]
    assert got == superfiltering_d(stage, embed, ifd_num=None, fla_num=3).tolist()


# --- --column: any numeric column, the policy's rules ------------------------------------------


def _ifd_family(tmp_path: Path, fmt: str = "parquet", sf: str = "ifd", extra: bool = True) -> Path:
    """An IFD-like score file over ``write_inputs``' 6 rows: the Superfiltering column ``sf``
    (``ifd`` or ``rifd``), and with ``extra`` the new ratio columns and token-loss lists."""
    cols = {
        "index": list(range(6)),
        "status": ["ok", "ok", "empty_output", "ok", "ok", "ok"],
        "loss_direct": [2.0, 3.5, None, 1.0, 3.5, 0.5],
        sf: [0.8, 0.3, None, 0.9, 1.2, 0.85],
    }
    if extra:
        cols["ifd_loss_ratio"] = [0.95, 0.99, None, 0.2, 0.7, 1.3]
        cols["ifd_informative"] = [0.5, 0.6, None, 0.7, 0.8, 0.9]
        cols["token_losses_direct"] = [[1.0, 2.0], [3.0], None, [], [0.5], [1.5, 1.5]]
    path = tmp_path / f"scores.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table(cols), path)
    else:
        rows = [{k: v[i] for k, v in cols.items()} for i in range(6)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_column_ranks_any_numeric_column_with_the_superfiltering_rules(
    tmp_path: Path, fmt: str
) -> None:
    data, _ = write_inputs(tmp_path)
    scores = _ifd_family(tmp_path, fmt)
    out = tmp_path / "o.jsonl"
    base = SelectConfig(scores=str(scores), data=str(data), output=str(out), rate=0.5)
    summary = run(dataclasses.replace(base, column="ifd_loss_ratio"))
    # < 1.0: rows 0 1 3 4 (row 5 is 1.3, row 2 has none), descending, k = 3
    assert [r["extra"] for r in jsonl(out)] == [1, 0, 4]
    assert [r["ifd_loss_ratio"] for r in jsonl(out)] == [0.99, 0.95, 0.7]
    assert "ifd" in jsonl(out)[0]  # the usual columns stay
    assert summary == {
        "column": "ifd_loss_ratio",
        "threshold": 1.0,
        "rows": 6,
        "eligible": 4,
        "selected": 3,
        "output": str(out),
    }
    # A loss: no natural cut, --threshold inf; ties (3.5) by the lower row.
    summary = run(dataclasses.replace(base, column="loss_direct", threshold=math.inf, count=4))
    assert [r["extra"] for r in jsonl(out)] == [1, 4, 0, 3]
    assert summary["threshold"] is None and summary["eligible"] == 5
    for column, match in (
        ("token_losses_direct", "column `token_losses_direct` .* is not numeric"),
        ("status", "is not numeric"),
        ("nope", "no `nope` column"),
    ):
        with pytest.raises(ValueError, match=match):
            run(dataclasses.replace(base, column=column))
    # The default selection does not change with the new columns in the file.
    (tmp_path / "plain").mkdir()
    plain = _ifd_family(tmp_path / "plain", fmt, extra=False)
    for policy in ("auto", "superfiltering"):
        run(dataclasses.replace(base, policy=policy, output=str(tmp_path / "new.json")))
        run(dataclasses.replace(base, scores=str(plain), output=str(tmp_path / "old.json")))
        assert (tmp_path / "new.json").read_bytes() == (tmp_path / "old.json").read_bytes()


def test_an_rifd_file_is_superfiltering_on_rifd(tmp_path: Path) -> None:
    data, _ = write_inputs(tmp_path)
    scores = _ifd_family(tmp_path, sf="rifd", extra=False)
    out = tmp_path / "o.json"
    summary = run(SelectConfig(scores=str(scores), data=str(data), output=str(out), rate=0.5))
    rows = json.loads(out.read_text())
    assert [r["extra"] for r in rows] == [3, 5, 0]
    assert [r["rifd"] for r in rows] == [0.9, 0.85, 0.8] and "ifd" not in rows[0]
    assert summary["column"] == "rifd" and summary["selected"] == 3
    assert detect_policy(["index", "rifd", "ifd_loss_ratio"]) == "superfiltering"
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"index": 0, "status": "ok", "rifd": 0.5, "score": 1.0}) + "\n")
    with pytest.raises(ValueError, match="both `rifd` and `score`"):
        run(SelectConfig(scores=str(both), output=str(out)))
    summary = run(SelectConfig(scores=str(both), output=str(out), policy="superfiltering"))
    assert summary["column"] == "rifd" and summary["selected"] == 0  # floor(0.1 x 1)


@pytest.mark.parametrize("keep", ["low", "high"])
def test_column_ranks_a_resonance_column_with_the_resofilter_rules(
    tmp_path: Path, keep: str
) -> None:
    data, scores = reso_inputs(tmp_path)
    table = pq.read_table(scores)
    loss = np.asarray([3.0, 1.0, 2.0, 9.0, 1.0, 0.5, 7.0, 4.0, 8.0, np.nan])
    pq.write_table(table.set_column(table.schema.get_field_index("loss"), "loss", [loss]), scores)
    out = tmp_path / "o.jsonl"
    base = SelectConfig(scores=str(scores), data=str(data), output=str(out), keep=keep)
    summary = run(dataclasses.replace(base, column="loss", drop_rate=0.4))
    ok = np.array([s == "ok" for s in RESO_STATUS])
    want = resofilter_select(np.where(ok, loss, np.nan), 0.4, keep=keep)
    assert [r["extra"] for r in jsonl(out)] == want.tolist()
    assert summary["column"] == "loss" and summary["scored"] == 6  # row 9 has no loss
    assert summary["outputs"][0]["selected"] == 6 - int(6 * 0.4)
    run(dataclasses.replace(base, column=FEATURE, drop_rate=0.5))
    rows = jsonl(out)
    assert FEATURE in rows[0] and "score" in rows[0]  # the ranked column is attached
    feature = table.column(FEATURE).to_numpy(zero_copy_only=False)
    want = resofilter_select(np.where(ok, feature, np.nan), 0.5, keep=keep)
    assert [r["extra"] for r in rows] == want.tolist()
    run(dataclasses.replace(base, column=FEATURE, with_features=True))
    assert list(jsonl(out)[0]).count(FEATURE) == 1
    with pytest.raises(ValueError, match="no `nope` column"):
        run(dataclasses.replace(base, column="nope"))


def test_new_flags_reach_the_config(tmp_path: Path) -> None:
    data, _ = write_inputs(tmp_path)
    scores = _ifd_family(tmp_path)
    cmd = [sys.executable, "-m", "resofilter_jax.select", f"--scores={scores}", f"--data={data}"]
    out = tmp_path / "o.jsonl"
    done = subprocess.run(
        [*cmd, "--column=ifd_loss_ratio", "--rate=0.5", f"--output={out}"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["column"] == "ifd_loss_ratio"
    assert [r["extra"] for r in jsonl(out)] == [1, 0, 4]
    bad = [
        (["--policy=representation", "--target_limit=3"], "needs --target"),
        (["--round_robin=false", "--target_rows=0:2"], "--target_rows, --round_robin do not apply"),
    ]
    for flags, message in bad:
        done = subprocess.run(
            [*cmd, *flags, f"--output={tmp_path / 'x.jsonl'}"],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        assert done.returncode != 0 and message in done.stderr, done.stderr
