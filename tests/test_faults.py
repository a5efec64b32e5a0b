"""Faults injected on purpose: each one ends in one clear line (exit 2, or 130 on Ctrl-C), loses nothing and
leaves earlier results intact."""
import multiprocessing
import os
import signal
import threading
import time

import pandas as pd
import pytest
import torch

import HoloMambaRec as H
from conftest import TINY, outputs


def argv_of(overrides):
    return [f"--{k}={v}" for k, v in overrides.items()]


def in_processes(target, *argument_lists):
    """Run target(*args) in one forked process per argument list (the targets run no torch code, so forking is
    safe); returns their exit codes."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in argument_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def one_line_error(capsys, phrase):
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and phrase in err[-1], err
    assert not any("Traceback" in line for line in err)


# --------------------------------------------------------------------------- non-finite models never score
def test_a_nan_model_fails_instead_of_scoring_perfectly(tiny, capsys):
    argv = argv_of(tiny) + ["--stage=benchmark", "--models=SASRec", "--seeds=0"]
    assert H.main(argv) == 0
    bench = H.Path(tiny["results_dir"]) / "benchmark.csv"
    rows = bench.read_bytes()
    (path,) = H.Path(tiny["checkpoint_dir"]).glob("*.pt")
    model = H.load(path, "cpu")
    with torch.no_grad():
        model.item_emb.weight[3, 0] = float("nan")
    with pytest.raises(H.TrainingError, match="scores are not finite"):
        H.rank_targets(model, H.load_dataset("synthetic").eval_split("test", 10, False))
    # the same through --resume on a checkpoint whose weights are NaN: exit 2, the results rows untouched
    H.save(model, path)
    capsys.readouterr()
    assert H.main(argv + ["--resume"]) == 2
    one_line_error(capsys, "scores are not finite")
    assert bench.read_bytes() == rows


def test_a_diverging_loss_is_one_line(tiny, capsys):
    assert H.main(argv_of(tiny) + ["--stage=benchmark", "--models=SASRec", "--lr=1e9", "--grad_clip=0",
                                   "--epochs=3"]) == 2
    one_line_error(capsys, "lower --lr")


# --------------------------------------------------------------------------- the grid log
def test_a_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "grid.csv"
    H.append_csv_row(path, {"trial": "a", "valid_ndcg@10": 0.1})
    H.append_csv_row(path, {"trial": "b", "valid_ndcg@10": 0.2})
    with open(path, "a") as fh:
        fh.write("c,0.3")  # a crash in the middle of an append: no end of line
    assert H.read_log(path)["trial"].tolist() == ["a", "b"]
    H.append_csv_row(path, {"trial": "d", "valid_ndcg@10": 0.4})
    assert pd.read_csv(path)["trial"].tolist() == ["a", "b", "d"]  # never glued onto the torn row


def _append_forever(path):
    i = 0
    while True:
        extra = {f"k{i // 5}": i} if i % 5 == 0 else {}  # every fifth row widens the header: a whole rewrite
        H.append_csv_row(path, {"trial": f"t{i}", **extra, "valid_ndcg@10": i / 1000})
        i += 1


def test_sigkill_during_appends_and_rewrites_loses_at_most_the_row_in_flight(tmp_path):
    path = tmp_path / "grid.csv"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_append_forever, args=(path,))
    child.start()
    time.sleep(0.8)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    table = H.read_log(path)
    n = len(table)
    assert n > 20 and table["trial"].tolist() == [f"t{i}" for i in range(n)]  # every finished row, in order
    assert table["valid_ndcg@10"].tolist() == pytest.approx([i / 1000 for i in range(n)])
    assert len(list(tmp_path.glob(".grid.csv.*.tmp"))) <= 1  # the killed rewrite's temporary file, if any
    H.append_csv_row(path, {"trial": "after", "valid_ndcg@10": 1.0})
    assert H.read_log(path)["trial"].tolist()[-1] == "after"
    assert not list(tmp_path.glob(".grid.csv.*.tmp"))  # the next writer removed it


def test_a_temporary_file_left_by_a_killed_rewrite_is_removed_by_the_next_append(tmp_path):
    path = tmp_path / "grid.csv"
    H.append_csv_row(path, {"trial": "a", "valid_ndcg@10": 0.1})
    stale = tmp_path / ".grid.csv.abc123.tmp"
    stale.write_text("trial,valid_ndcg@10\na,0.1\nb,")  # what SIGKILL mid-rewrite leaves
    other = tmp_path / ".results.csv.abc123.tmp"
    other.write_text("x")  # another file's temporary: not this log's to remove
    H.append_csv_row(path, {"trial": "b", "valid_ndcg@10": 0.2})
    assert not stale.exists() and other.exists()
    assert H.read_log(path)["trial"].tolist() == ["a", "b"]


def test_a_failing_rewrite_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "grid.csv"
    H.append_csv_row(path, {"trial": "a", "x": 1})
    before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(H.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        H.append_csv_row(path, {"trial": "b", "x": 2, "new_column": 3})  # a new column: a whole rewrite
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(tmp_path.glob(".grid.csv.*"))


def test_a_diverging_trial_is_recorded_and_skipped_on_rerun(tiny):
    base = H.config(**{**tiny, "grid": "lr=0.001,1000000000", "grad_clip": 0.0, "epochs": 3})
    H.grid_stage(H.RunStore(base), [base])
    log = H.read_log(tiny["grid_csv"])
    assert len(log) == 2 and log["error"].notna().tolist() == [False, True]
    assert "lower --lr" in log["error"].iloc[1]
    store = H.RunStore(base)
    best = H.grid_stage(store, [base])  # nothing is trained again, and the failure is not the best
    assert len(store.runs) == 0 and len(H.read_log(tiny["grid_csv"])) == 2
    assert best[0]["lr"] == 0.001


def test_the_summary_survives_a_best_row_from_an_earlier_grid(tiny, capsys):
    path = H.Path(tiny["grid_csv"])
    H.append_csv_row(path, {"trial": "synthetic|old", "dataset": "synthetic", "d_state": 32, "valid_ndcg@10": 0.99})
    base = H.config(**{**tiny, "grid": "dropout=0.1"})
    H.grid_stage(H.RunStore(base), [base])
    assert "valid NDCG@10=0.9900" in capsys.readouterr().out


def _claim_and_log(log, worker):
    for i in range(12):
        if H.claim_trial(log, f"t{i}"):
            time.sleep(0.005)  # "training"
            H.append_csv_row(log, {"trial": f"t{i}", "worker": worker})


def test_processes_sharing_a_grid_log_claim_each_trial_once(tmp_path):
    log = tmp_path / "grid.csv"
    assert in_processes(_claim_and_log, (log, 0), (log, 1), (log, 2)) == [0, 0, 0]
    table = H.read_log(log)
    assert sorted(table["trial"]) == sorted(f"t{i}" for i in range(12)) and table["trial"].is_unique


def test_the_grid_skips_a_trial_another_live_process_claimed(tiny):
    base = H.config(**{**tiny, "grid": "dropout=0.1,0.2", "epochs": 1})
    data = H.load_dataset(base)
    taken = f"synthetic|{H.run_hash(H.fitted_config(base.replace(dropout=0.2), data))}"
    H.Path(tiny["grid_csv"]).parent.mkdir(parents=True)
    with open(f"{tiny['grid_csv']}.claims", "w") as fh:  # claimed by our parent process, which is alive
        fh.write(f"{taken},{H.socket.gethostname()},{os.getppid()}\n")
    store = H.RunStore(base)
    H.grid_stage(store, [base])
    assert H.read_log(tiny["grid_csv"])["dropout"].tolist() == [0.1] and len(store.runs) == 1


def test_a_dead_claimant_does_not_block_a_trial(tmp_path):
    log = tmp_path / "grid.csv"
    (tmp_path / "grid.csv.claims").write_text(f"trial-x,{H.socket.gethostname()},999999\n")  # no such process
    assert H.claim_trial(log, "trial-x")
    assert in_processes(H.claim_trial, (log, "trial-y")) == [0]
    assert H.claim_trial(log, "trial-y")  # its claimant exited: the trial is free again


def test_waiting_for_a_trial_ends_when_it_is_logged_or_its_claimant_is_gone(tmp_path):
    """A trial claimed by a live process (our parent) holds wait_for_trial until the log has it; one whose
    claimant is gone, or nobody's, does not hold it at all."""
    log = tmp_path / "memory_runs.csv"
    (tmp_path / "memory_runs.csv.claims").write_text(f"base,{H.socket.gethostname()},{os.getppid()}\n"
                                                     f"old,{H.socket.gethostname()},999999\n")
    assert H.claimed_elsewhere(log, "base") and not H.claimed_elsewhere(log, "old")
    assert not H.claim_trial(log, "base")
    finish = threading.Timer(0.3, H.append_csv_row, (log, {"trial": "base"}))
    start = time.perf_counter()
    finish.start()
    H.wait_for_trial(log, "base", poll=0.05)
    assert time.perf_counter() - start >= 0.3 and "base" in set(H.read_log(log)["trial"])
    H.wait_for_trial(log, "old", poll=60)  # would sleep a minute if it waited
    H.wait_for_trial(log, "nobody's", poll=60)


# --------------------------------------------------------------------------- concurrent writers, merged stages
def _write_many(path, worker):
    for i in range(40):
        H.write_csv(path, [{"worker": worker, "i": i}])


def test_concurrent_atomic_writes_never_collide(tmp_path):
    path = tmp_path / "same.csv"
    assert in_processes(_write_many, (path, 0), (path, 1), (path, 2)) == [0, 0, 0]
    assert len(pd.read_csv(path)) == 1 and not list(tmp_path.glob(".same.csv.*"))


def test_stage_files_merge_the_rows_of_other_datasets(tmp_path):
    results = tmp_path / "r"
    H.upsert_csv(results / "compression.csv", [{"dataset": "a", "model": "HoloMamba", "k": 1, "bundling": "none",
                                                "history_len": 8, "ndcg@10": 0.1}],
                 ["dataset", "model", "k", "bundling", "history_len"])
    overrides = {**TINY, **outputs(tmp_path), "results_dir": str(results), "dataset": "synthetic",
                 "bundle_windows": "1", "compression_len": 8, "models": "SASRec", "epochs": 1}
    base, configs = H.plan(overrides)
    H.compression_stage(H.RunStore(base), configs)
    assert set(pd.read_csv(results / "compression.csv")["dataset"]) == {"a", "synthetic"}
    H.update_json(results / "grid_best.json", {"a": {"x": 1}})
    H.update_json(results / "grid_best.json", {"b": {"x": 2}})
    assert set(H.json.loads((results / "grid_best.json").read_text())) == {"a", "b"}


# --------------------------------------------------------------------------- hostile files and folders
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_checkpoints_and_records_under_resume_are_one_line(tiny, capsys):
    cfg = H.config(**tiny)
    run = H.RunStore(cfg).run(cfg, "GRU4Rec", 0)
    argv = argv_of(tiny) + ["--stage=benchmark", "--models=GRU4Rec", "--seeds=0", "--resume"]
    checkpoint, record = H.Path(run.checkpoint), H.Path(tiny["results_dir"]) / "runs" / f"{run.name}.json"
    good_checkpoint, good_record = checkpoint.read_bytes(), record.read_text()
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    other = H.build_model("GRU4Rec", H.catalog_only(5), d_model=8, device="cpu")
    for name, damage, phrase in [
        ("zero bytes", lambda: checkpoint.write_bytes(b""), "not a readable HoloMambaRec checkpoint"),
        ("truncated", lambda: checkpoint.write_bytes(good_checkpoint[:500]), "not a readable HoloMambaRec checkpoint"),
        ("malicious", lambda: checkpoint.write_bytes(pickle.dumps(Evil())), "not a readable HoloMambaRec checkpoint"),
        ("other shape", lambda: H.save(other, checkpoint), "does not fit this GRU4Rec"),
        ("record", lambda: record.write_text(good_record[:40]), "not a readable run record"),
    ]:
        damage()
        assert H.main(argv) == 2, name
        one_line_error(capsys, phrase)
        checkpoint.write_bytes(good_checkpoint)
        record.write_text(good_record)
    assert H.main(argv) == 0  # repaired: resumed, not trained


def test_a_resume_on_other_data_trains_again(tiny, capsys):
    cfg = H.config(**tiny)
    run = H.RunStore(cfg).run(cfg, "SASRec", 0)
    record = H.Path(tiny["results_dir"]) / "runs" / f"{run.name}.json"
    record.write_text(record.read_text().replace(run.data_fingerprint, "0" * 16))
    H.RunStore(cfg.replace(resume=True)).run(cfg.replace(resume=True), "SASRec", 0)
    assert "trained on other data" in capsys.readouterr().err


def test_outputs_are_checked_before_training(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for key, value, phrase in [("results_dir", blocker / "sub", "--results_dir="), ("grid_csv", "", "--grid_csv="),
                               ("checkpoint_dir", blocker, "--checkpoint_dir=")]:
        start = time.perf_counter()
        assert H.main(argv_of({**tiny, key: value}) + ["--stage=benchmark", "--models=SASRec"]) == 2
        one_line_error(capsys, phrase)
        assert time.perf_counter() - start < 5  # found before any training
    bench = H.Path(tiny["results_dir"]) / "benchmark.csv"
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text("")  # zero bytes: no rows yet
    assert H.main(argv_of(tiny) + ["--stage=benchmark", "--models=SASRec"]) == 0
    assert len(pd.read_csv(bench)) == 2
    bench.write_text('dataset,model\n"unclosed,quote\n')
    assert H.main(argv_of(tiny) + ["--stage=benchmark", "--models=SASRec"]) == 2
    one_line_error(capsys, "benchmark.csv is not a readable CSV")


def test_a_huge_max_len_is_cut_to_the_longest_history(tiny, capsys):
    cfg = H.config(**{**tiny, "max_len": 100000, "epochs": 1})
    run = H.RunStore(cfg).run(cfg, "SASRec", 0)
    assert run.cfg["max_len"] == 39 and "longer than the longest history: using 39" in capsys.readouterr().err


def test_hostile_data_files_are_one_line(tmp_path, capsys):
    (tmp_path / "t.inter").write_text("user id:token\titem-id:token\ttimestamp:float\nu\ta\t1\n")
    (tmp_path / "s.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\t2\nu\tc\t3\n")
    (tmp_path / "s.item").write_text("category:token\nx\n")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "interactions.csv").write_bytes(b"user,item\n\xff\xfe,\x00\n")
    cases = [(f"recbole:{tmp_path / 't'}", "lacks the field(s) ['item_id', 'user_id']"),
             (f"recbole:{tmp_path / 's'}", "lacks the field item_id"),
             (f"csv:{tmp_path / 'own'}", "fix the file")]
    for spec, phrase in cases:
        assert H.main(["--stage=stats", f"--dataset={spec}", "--min_user_count=1", "--min_item_count=1"]) == 2
        one_line_error(capsys, phrase)
    few = tmp_path / "few.csv"
    few.write_text("user,item\nu,a\nu,b\nv,a\n")
    assert H.main(["--stage=stats", f"--dataset=csv:{few}", "--min_user_count=1", "--min_item_count=1"]) == 2
    one_line_error(capsys, "leave-one-out needs at least 3 interactions per user")


# --------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("average", [0.0, 1.0])
def test_ctrl_c_keeps_the_best_weights_and_resume_continues(tiny, capsys, monkeypatch, average):
    overrides = {**tiny, "epochs": 6, "patience": 10, "weight_average": average}
    real, calls = H.rank_targets, []

    def interrupt_at_the_third_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(H, "rank_targets", interrupt_at_the_third_evaluation)
    assert H.main(argv_of(overrides) + ["--stage=benchmark", "--models=SASRec", "--seeds=0"]) == 130
    err = capsys.readouterr().err
    assert "interrupted after epoch 2" in err and err.strip().splitlines()[-1].startswith("interrupted:")
    (partial,) = H.Path(tiny["checkpoint_dir"]).glob("*.partial.pt")
    state = torch.load(partial, weights_only=True)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    if average:  # the average is kept with the weights at the interruption: 3 epochs of 5 steps (600 users, 128)
        model = H.build_model("SASRec", H.load_dataset("synthetic"), **TINY)
        assert state["average"]["updates"] == 15
        assert [t.shape for t in state["average"]["shadow"]] == [p.shape for p in model.parameters()]
    else:
        assert state["average"] is None
    assert not (H.Path(tiny["results_dir"]) / "benchmark.csv").exists()  # nothing half-written
    monkeypatch.setattr(H, "rank_targets", real)
    assert H.main(argv_of(overrides) + ["--stage=benchmark", "--models=SASRec", "--seeds=0", "--resume"]) == 0
    assert "continuing from" in capsys.readouterr().err and not partial.exists()
    (record,) = (H.Path(tiny["results_dir"]) / "runs").glob("*.json")
    assert [h["epoch"] for h in H.json.loads(record.read_text())["history"]] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_in_a_download_leaves_nothing(tmp_path, monkeypatch):
    class Response:
        headers = {}

        def raise_for_status(self):
            pass

        def iter_content(self, size):
            yield b"\x1f\x8b partial"
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    import requests
    monkeypatch.setattr(requests, "get", lambda *a, **k: Response())
    with pytest.raises(KeyboardInterrupt):
        H.download_file("https://example.invalid/x.gz", tmp_path / "d" / "x.gz")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("meta,phrase", [
    ("{'asin': 'zz', 'categories': [['Beauty']]}\n", "holds no metadata for any reviewed item"),
    ("['asin', 'ia']  # 'asin': 'ia'\n", "not an item's metadata"),
    ("", "holds no metadata for any reviewed item"),
])
def test_beauty_metadata_that_matches_nothing_or_is_not_a_dict(tmp_path, meta, phrase):
    import gzip
    import json

    folder = tmp_path / "amazon-beauty"
    folder.mkdir()
    rows = [{"reviewerID": f"u{u}", "asin": i, "unixReviewTime": t} for u in range(3) for t, i in enumerate("abc")]
    rows = [dict(r, asin="ia" if r["asin"] == "a" else r["asin"]) for r in rows]
    with gzip.open(folder / "reviews_Beauty_5.json.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with gzip.open(folder / "meta_Beauty.json.gz", "wt") as fh:
        fh.write(meta)
    with pytest.raises(H.DataError, match=phrase):
        H.load_dataset("amazon-beauty", data_dir=str(tmp_path), download=False, min_user_count=1, min_item_count=1)
