"""--jobs: runs trained at once in worker processes give the same results, files and errors as one process."""
import json
import os
import signal

import pandas as pd
import pytest
import torch

import HoloMambaRec as H
from conftest import TINY, outputs


def argv_of(overrides):
    return [f"--{k}={v}" for k, v in overrides.items()]


def benchmark(folder, jobs, **extra):
    overrides = {**TINY, **outputs(folder), "dataset": "synthetic", "stage": "benchmark", "jobs": jobs, **extra}
    assert H.main(argv_of(overrides)) == 0
    return pd.read_csv(folder / "results" / "benchmark.csv")


@pytest.fixture
def worker_threads():
    """This process computes with the CPU threads of one of two workers (their sums then add in the same order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    yield
    torch.set_num_threads(threads)


def test_jobs_give_the_runs_of_one_process(tmp_path, worker_threads):
    keys, metrics = ["model", "seed", "split"], ["hr@10", "ndcg@10", "mrr", "epochs", "best_epoch"]
    one = benchmark(tmp_path / "one", 1, models="HoloMamba,SASRec", seeds="0,1").sort_values(keys)
    two = benchmark(tmp_path / "two", 2, models="HoloMamba,SASRec", seeds="0,1").sort_values(keys)
    assert len(one) == len(two) == 8
    pd.testing.assert_frame_equal(one[keys + metrics].reset_index(drop=True), two[keys + metrics].reset_index(drop=True),
                                  check_exact=False, atol=1e-6)
    for path in (tmp_path / "one" / "checkpoints").glob("*.pt"):  # the same weights, to 1e-6
        a, b = (H.read_checkpoint(folder / "checkpoints" / path.name)["state_dict"] for folder in
                (tmp_path / "one", tmp_path / "two"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), path.name
    slices = [pd.read_csv(tmp_path / f / "results" / "slices.csv") for f in ("one", "two")]
    assert len(slices[0]) == len(slices[1]) > 0
    assert len(list((tmp_path / "two" / "results" / "runs").glob("*.json"))) == 4


def test_jobs_deal_out_a_grid_each_trial_once(tmp_path):
    overrides = {**TINY, **outputs(tmp_path), "dataset": "synthetic", "stage": "grid", "jobs": 2,
                 "grid": "dropout=0.1,0.3;n_layers=1,2"}
    assert H.main(argv_of(overrides)) == 0
    log = pd.read_csv(tmp_path / "results" / "grid.csv")
    assert len(log) == 4 and log["trial"].nunique() == 4 and log["valid_ndcg@10"].notna().all()
    claims = [line.split(",") for line in (tmp_path / "results" / "grid.csv.claims").read_text().splitlines()]
    pids = {int(c[-1]) for c in claims}  # trial, host, pid
    assert len(claims) == 4 and len(pids) == 2 and os.getpid() not in pids  # trained by the two workers


def test_an_extension_waits_for_its_base_trained_once(tmp_path):
    table = benchmark(tmp_path, 2, models="SASRec,RAMRec", seeds="0", warm_start="all")
    assert sorted(table["model"].unique()) == ["RAMRec", "SASRec"]
    records = {p.name.split("_")[1]: json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")}
    assert len(records) == 2  # one SASRec run: the base of RAMRec's warm start is the benchmark's own
    sasrec = records["SASRec"]
    assert records["RAMRec"]["history"][0]["epoch"] == 0
    assert records["RAMRec"]["history"][0]["valid_ndcg@10"] == pytest.approx(sasrec["metrics"]["valid"]["ndcg@10"],
                                                                             abs=1e-9)


def test_an_error_in_a_worker_is_one_line(tmp_path, capsys):
    benchmark(tmp_path, 2, models="GRU4Rec,SASRec", seeds="0")
    record = next((tmp_path / "results" / "runs").glob("*GRU4Rec*.json"))
    record.write_text("{not json")
    overrides = {**TINY, **outputs(tmp_path), "dataset": "synthetic", "stage": "benchmark", "jobs": 2,
                 "models": "GRU4Rec,SASRec", "seeds": "0", "resume": True}
    assert H.main(argv_of(overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "not a readable run record" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_stopped_worker_skips_its_queued_items(monkeypatch):
    monkeypatch.setattr(H, "WORKER", {"store": "the store"})
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, H.interrupt_worker)
        assert H.call_in_worker(lambda store, item: (store, item), 3) == ("the store", 3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the first signal interrupts
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # later ones cannot cut a save short
        os.kill(os.getpid(), signal.SIGINT)
        called = []
        with pytest.raises(KeyboardInterrupt):
            H.call_in_worker(lambda store, item: called.append(item), 4)
        assert called == []
    finally:
        signal.signal(signal.SIGINT, previous)


def test_jobs_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(H.ConfigError, match="jobs"):
        H.config(jobs=2)
