"""Result files: atomic CSV writes, appends, upserts keyed by run (config tags are strings), summaries."""
import json

import pandas as pd
import pytest

import HoloMambaRec as H

KEY = ["dataset", "model", "seed", "split", "preset", "config"]


def row(config, value, seed=1):
    return {"dataset": "synthetic", "model": "HoloMamba", "seed": seed, "split": "test", "preset": "quick",
            "config": config, "ndcg@10": value}


@pytest.mark.parametrize("tag", ["abcdef12", "0123abcd", "01234567", "12e45678"])
def test_upsert_replaces_the_row_of_the_same_run(tmp_path, tag):
    """config_tag is 8 hex digits, so some tags look like numbers ("01234567", "12e45678"); the upsert must
    still recognise the earlier row of the same run and keep the tag text unchanged."""
    path = tmp_path / "bench.csv"
    H.upsert_csv(path, [row(tag, 0.1), row(tag, 0.2, seed=2)], KEY)
    H.upsert_csv(path, [row(tag, 0.5)], KEY)
    table = pd.read_csv(path, dtype={"config": str})
    assert len(table) == 2
    assert sorted(table["config"]) == [tag, tag]
    assert table.set_index("seed")["ndcg@10"].to_dict() == {1: 0.5, 2: 0.2}


def test_upsert_keeps_other_runs(tmp_path):
    path = tmp_path / "bench.csv"
    H.upsert_csv(path, [row("aaaaaaaa", 0.1)], KEY)
    out = H.upsert_csv(path, [row("bbbbbbbb", 0.2)], KEY)
    assert len(out) == 2 and len(pd.read_csv(path)) == 2


def test_upsert_with_a_key_column_the_file_lacks_keeps_its_rows(tmp_path):
    """A key column added later (memory_depth.csv's variant): the older rows stay, blank there, unless derive fills them."""
    path = tmp_path / "depth.csv"
    pd.DataFrame([{"dataset": "d", "seed": 1, "users": 5}]).to_csv(path, index=False)
    out = H.upsert_csv(path, [{"dataset": "d", "variant": "new", "seed": 1, "users": 7}], ["dataset", "variant", "seed"],
                       derive=lambda t: t.fillna({"variant": "old"}))
    assert sorted(zip(out["variant"], out["users"])) == [("new", 7), ("old", 5)]
    again = H.upsert_csv(path, [{"dataset": "d", "variant": "old", "seed": 1, "users": 9}], ["dataset", "variant", "seed"])
    assert sorted(zip(again["variant"], again["users"])) == [("new", 7), ("old", 9)]


def test_append_csv_row_writes_header_once(tmp_path):
    path = tmp_path / "sub" / "grid.csv"
    for i in range(3):
        H.append_csv_row(path, {"trial": f"synthetic|t{i}", "valid_ndcg@10": i / 10})
    lines = path.read_text().splitlines()
    assert lines[0] == "trial,valid_ndcg@10" and len(lines) == 4
    assert pd.read_csv(path)["trial"].tolist() == ["synthetic|t0", "synthetic|t1", "synthetic|t2"]


def test_write_csv_and_json_are_atomic(tmp_path):
    H.write_csv(tmp_path / "a" / "x.csv", [{"a": 1, "b": "z"}, {"a": 2, "b": "y"}])
    H.write_json(tmp_path / "a" / "x.json", {"v": 1.5})
    assert pd.read_csv(tmp_path / "a" / "x.csv").to_dict("records") == [{"a": 1, "b": "z"}, {"a": 2, "b": "y"}]
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": 1.5}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.csv", "x.json"]


def test_summarise_mean_and_std_over_seeds():
    rows = [dict(row("t", 0.0, seed=s), **{c: v for c in ["hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"]})
            for s, v in ((1, 0.2), (2, 0.4))]
    out = H.summarise(rows)
    assert len(out) == 1 and out.iloc[0]["seeds"] == 2
    assert out.iloc[0]["ndcg@10"] == "0.3000 ± 0.1414"  # sample std of (0.2, 0.4)


def _upsert_many(path, worker, count):
    for seed in range(count):
        H.upsert_csv(path, [row(f"w{worker}", seed / 100, seed=seed)], KEY)


def test_concurrent_upserts_into_one_folder_lose_no_rows(tmp_path):
    """Several benchmark processes may share a results folder; each upsert reads, merges and rewrites the
    file, so without the folder lock a row written between another process's read and write is lost."""
    import multiprocessing

    path, workers, count = tmp_path / "bench.csv", 4, 15
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_upsert_many, args=(path, w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    table = pd.read_csv(path, dtype={"config": str})
    assert len(table) == workers * count
    assert sorted(table.groupby("config")["seed"].nunique().tolist()) == [count] * workers
