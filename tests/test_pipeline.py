"""End to end: reproducible runs, checkpoints, the --quick pipeline through main(), grid resumption, stats."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import HoloMambaRec as H


def small_cfg(tmp_path, **extra):
    return H.resolve_config({"d_model": 16, "n_layers": 1, "d_state": 8, "max_len": 10, "epochs": 2,
                             "batch_size": 128, "device": "cpu", "dropout": 0.1,
                             "checkpoint_dir": str(tmp_path / "ck"), "results_dir": str(tmp_path / "res"),
                             "figures_dir": str(tmp_path / "fig"), "grid_csv": str(tmp_path / "grid.csv"),
                             **extra}, "synthetic")


@pytest.mark.parametrize("name", ["HoloMamba", "GRU4Rec"])
def test_same_seed_same_metrics_and_checkpoint_roundtrip(name, tmp_path):
    cfg = small_cfg(tmp_path)
    H._RUN_CACHE.clear()
    first = H.train_and_evaluate(cfg, name, 7)
    assert H.train_and_evaluate(cfg, name, 7) is first  # memoised within the process
    H._RUN_CACHE.clear()
    second = H.train_and_evaluate(cfg, name, 7)
    assert second is not first
    assert first["metrics"] == second["metrics"]
    assert [h["loss"] for h in first["history"]] == [h["loss"] for h in second["history"]]
    for split in ("valid", "test"):
        assert torch.equal(first["ranks"][split], second["ranks"][split])
    assert first["epochs"] == 2 and len(first["history"]) == 2
    assert 0 <= first["metrics"]["test"]["hr@10"] <= 1

    # the checkpoint: plain data (weights_only=True), with the config, and it reproduces the test metrics
    (path,) = (tmp_path / "ck").glob(f"synthetic_{name}_seed7_*.pt")
    # named by the tag of the config the run used (scan_backend "auto" resolved to "parallel" on the CPU)
    assert first["cfg"]["scan_backend"] == "parallel"
    assert path.name == f"synthetic_{name}_seed7_{H.config_tag(first['cfg'])}.pt" == \
        f"synthetic_{name}_seed7_{first['config']}.pt"
    payload = torch.load(path, weights_only=True)
    assert {"state_dict", "config", "metrics", "epoch"} <= set(payload)
    assert payload["config"]["d_model"] == 16 and payload["config"]["dataset"] == "synthetic"
    assert payload["metrics"] == first["metrics"]
    data = H.load_dataset(payload["config"])
    model = H.build_model(name, payload["config"], data)
    model.load_state_dict(payload["state_dict"])
    cfg, cpu = payload["config"], torch.device("cpu")
    ranks = H.target_ranks(model, *H.evaluation_split(data, "test", cfg["max_len"], cfg, cpu)[:2], cfg, cpu,
                           H.evaluation_split(data, "test", cfg["max_len"], cfg, cpu)[2])
    assert H.full_ranking_metrics(ranks) == first["metrics"]["test"]


def test_different_seeds_give_different_runs(tmp_path):
    cfg = small_cfg(tmp_path, epochs=1)
    a = H.train_and_evaluate(cfg, "GRU4Rec", 1)
    b = H.train_and_evaluate(cfg, "GRU4Rec", 2)
    assert a["history"][0]["loss"] != b["history"][0]["loss"]


def test_training_reduces_loss(tmp_path):
    run = H.train_and_evaluate(small_cfg(tmp_path, epochs=3, lr=3e-3), "SASRec", 0)
    losses = [h["loss"] for h in run["history"]]
    assert losses[-1] < losses[0]
    assert all(np.isfinite(losses))


def test_sampled_softmax_training_runs(tmp_path):
    run = H.train_and_evaluate(small_cfg(tmp_path, epochs=1, num_negatives=16, train_window="random"), "HoloMamba", 0)
    assert np.isfinite(run["history"][0]["loss"]) and run["history"][0]["loss"] > 0


QUICK_OVERRIDES = ["--epochs=2", "--efficiency_lengths=16", "--efficiency_catalogs=500", "--bundle_windows=1,2",
                   "--compression_len=16"]


def quick_argv(tmp_path):
    return ["--quick", *QUICK_OVERRIDES, f"--results_dir={tmp_path / 'results'}",
            f"--figures_dir={tmp_path / 'figures'}", f"--checkpoint_dir={tmp_path / 'checkpoints'}",
            f"--grid_csv={tmp_path / 'results' / 'grid.csv'}"]


def test_quick_pipeline_end_to_end(tmp_path, monkeypatch):
    assert H.main(quick_argv(tmp_path)) == 0
    results = tmp_path / "results"
    quick = H.resolve_config(H.parse_cli(quick_argv(tmp_path)))
    models = H.as_list(quick["models"])
    assert models == ["HoloMamba", "SASRec", "GRU4Rec"]

    def rows(name):
        return pd.read_csv(results / name)

    bench = rows("benchmark.csv")
    assert len(bench) == len(models) * 2  # one row per model and split (valid, test), one seed
    assert set(bench["model"]) == set(models) and set(bench["split"]) == {"valid", "test"}
    assert (bench["dataset"] == "synthetic").all() and (bench["preset"] == "quick").all()
    assert (bench["epochs"] == 2).all()
    metric_cols = [c for c in H.METRIC_COLUMNS]
    assert ((bench[metric_cols] >= 0) & (bench[metric_cols] <= 1)).all().all()
    assert len(rows("accuracy.csv")) == len(models) * 2
    ablation = rows("ablation.csv")
    assert len(ablation) == 4 and set(ablation["model"]) == {"HoloMamba", "Mamba-ItemOnly"}
    # the benchmark and the ablation share the HoloMamba run (same config tag, same metrics)
    holo_b = bench[(bench["model"] == "HoloMamba") & (bench["split"] == "test")].iloc[0]
    holo_a = ablation[(ablation["model"] == "HoloMamba") & (ablation["split"] == "test")].iloc[0]
    assert holo_a["config"] == holo_b["config"] and holo_a["ndcg@10"] == holo_b["ndcg@10"]
    compression = rows("compression.csv")
    assert compression["k"].tolist() == [1, 2, 2] and compression["tokens_per_user"].tolist() == [16, 8, 8]
    assert compression["bundling"].tolist() == ["none", "untrained", "trained"]
    efficiency = rows("efficiency.csv")
    assert len(efficiency) == 3 and set(efficiency["model"]) == {"HoloMamba", "SASRec", "GRU4Rec"}
    assert (efficiency["max_len"] == 16).all()
    assert len(rows("efficiency_catalog.csv")) == 2  # 500 items x (full, sampled)
    cold = rows("cold_start.csv")
    assert set(cold["model"]) == set(models)
    assert (cold[cold["slice"] == "all users"]["users"] == 600).all()
    history = rows("history.csv")
    assert len(history) == 2 * (len(models) + 1)  # 2 epochs of each run in benchmark + ablation
    grid = rows("grid.csv")
    assert len(grid) == quick["grid_max_trials"] == 2
    assert grid["trial"].is_unique
    best = json.loads((results / "grid_best.json").read_text())
    assert best["synthetic"]["valid_ndcg@10"] == grid["valid_ndcg@10"].max()

    figures = tmp_path / "figures"
    expected = {"learning_curves_synthetic.png", "ablation.png", "compression.png", "efficiency.png",
                "grid_search.png"}
    assert {p.name for p in figures.glob("*.png")} == expected
    for p in figures.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # checkpoints: benchmark (3) + Mamba-ItemOnly (1) + two grid trials (d_model 64, new config tags)
    # + the compression stage's model trained with bundle_k = 2
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 7
    for path in checkpoints:
        payload = torch.load(path, weights_only=True)
        assert "config" in payload and payload["config"]["dataset"] == "synthetic"
        assert payload["config"]["epochs"] == 2
        assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files

    # rerun of the grid stage: every trial is already in grid.csv, so nothing is trained again
    def no_training(*args, **kwargs):
        raise AssertionError("the grid stage retrained a finished trial")

    monkeypatch.setattr(H, "train_and_evaluate", no_training)
    H._RUN_CACHE.clear()
    assert H.main(quick_argv(tmp_path) + ["--stage=grid"]) == 0
    regrid = rows("grid.csv")
    assert len(regrid) == 2
    pd.testing.assert_frame_equal(regrid, grid)


def test_grid_resumes_after_partial_run(tmp_path, monkeypatch):
    base = {"d_model": 16, "n_layers": 1, "epochs": 1, "max_len": 8, "dataset": "synthetic", "device": "cpu",
            "grid_csv": str(tmp_path / "grid.csv"), "results_dir": str(tmp_path / "res"),
            "checkpoint_dir": str(tmp_path / "ck"), "grid_max_trials": 1}
    calls = []
    real = H.train_and_evaluate

    def counting(cfg, model_name, seed, distributed=True):
        calls.append(cfg["attribute_mode"])
        return real(cfg, model_name, seed, distributed)

    monkeypatch.setattr(H, "GRID", {"d_model": [16], "n_layers": [1], "dropout": [0.1],
                                    "attribute_mode": ["first", "all"]})
    monkeypatch.setattr(H, "train_and_evaluate", counting)
    H.grid_stage(base)
    assert calls == ["first"] and len(pd.read_csv(tmp_path / "grid.csv")) == 1
    H._RUN_CACHE.clear()
    H.grid_stage(dict(base, grid_max_trials=0))  # all trials: only the unfinished one is trained
    assert calls == ["first", "all"]
    table = pd.read_csv(tmp_path / "grid.csv")
    assert len(table) == 2 and table["attribute_mode"].tolist() == ["first", "all"]


def naive_k_core(df, k_user, k_item):
    rows = list(zip(df["user"], df["item"]))
    while True:
        item_count, user_count = {}, {}
        for u, i in rows:
            item_count[i] = item_count.get(i, 0) + 1
        kept = [(u, i) for u, i in rows if item_count[i] >= k_item]
        for u, i in kept:
            user_count[u] = user_count.get(u, 0) + 1
        kept = [(u, i) for u, i in kept if user_count[u] >= max(k_user, 3)]
        if len(kept) == len(rows):
            return kept
        rows = kept


def test_stats_stage_prints_counts(capsys, tmp_path):
    code = H.main(["--stage=stats", "--dataset=synthetic", f"--results_dir={tmp_path / 'r'}",
                   f"--figures_dir={tmp_path / 'f'}"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    stats = json.loads(out[-1])
    df, attributes = H.synthetic_interactions()
    kept = naive_k_core(df, H.GLOBAL_CONFIG["min_user_count"], H.GLOBAL_CONFIG["min_item_count"])
    items = {i for _, i in kept}
    assert stats["dataset"] == "synthetic"
    assert stats["users"] == len({u for u, _ in kept})
    assert stats["items"] == len(items)
    assert stats["interactions"] == len(kept)
    assert stats["attributes"] == len({attributes[i][0] for i in items})
    assert not (tmp_path / "f").exists()  # the stats stage draws no figures


def test_resume_reuses_a_finished_run_without_training(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, epochs=1)
    H._RUN_CACHE.clear()
    first = H.train_and_evaluate(cfg, "GRU4Rec", 3)
    H._RUN_CACHE.clear()
    monkeypatch.setattr(H, "fit", lambda *a, **k: pytest.fail("--resume trained again"))
    again = H.train_and_evaluate(dict(cfg, resume=True), "GRU4Rec", 3)
    assert again["config"] == first["config"]  # resume does not change the run's identity
    assert again["metrics"] == first["metrics"] and again["history"] == first["history"]
    assert torch.equal(again["ranks"]["test"], first["ranks"]["test"])


def test_grid_key_overrides_the_scripts_grid(tmp_path):
    cfg = small_cfg(tmp_path, epochs=1, grid="dropout=0.1,0.3;n_layers=1")
    assert H.grid_trials(cfg) == [{"dropout": 0.1, "n_layers": 1}, {"dropout": 0.3, "n_layers": 1}]
    with pytest.raises(H.ConfigError, match="--grid"):
        small_cfg(tmp_path, grid="dropout")
    with pytest.raises(H.ConfigError, match="--grid: unknown config key 'dropuot'"):
        small_cfg(tmp_path, grid="dropuot=0.1")
    with pytest.raises(H.ConfigError, match="--dropout=x"):
        small_cfg(tmp_path, grid="dropout=0.1,x")


def test_grid_log_widens_its_header_for_a_new_grid(tmp_path):
    path = tmp_path / "grid.csv"
    H.append_csv_row(path, {"trial": "a", "dropout": 0.1})
    H.append_csv_row(path, {"trial": "b", "lr": 0.002, "dropout": 0.2})
    table = pd.read_csv(path)
    assert list(table.columns) == ["trial", "dropout", "lr"]
    assert table["trial"].tolist() == ["a", "b"] and table["dropout"].tolist() == [0.1, 0.2]
    assert table["lr"].isna().tolist() == [True, False]
