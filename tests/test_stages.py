"""Each stage on one small benchmark trained once per session (the `trained` fixture), and main() end to end."""
import json

import pandas as pd
import pytest
import torch

import HoloMambaRec as H

MODELS = ["HoloMamba", "SASRec", "GRU4Rec"]


def rows(trained, name):
    return pd.read_csv(trained.results / name, dtype={"config": str})


def test_benchmark_writes_one_row_per_model_and_split(trained):
    bench = rows(trained, "benchmark.csv")
    assert len(bench) == len(MODELS) * 2 and set(bench["model"]) == set(MODELS)
    assert set(bench["split"]) == {"valid", "test"} and (bench["epochs"] == 2).all()
    assert ((bench[H.METRIC_COLUMNS] >= 0) & (bench[H.METRIC_COLUMNS] <= 1)).all().all()
    assert len(rows(trained, "accuracy.csv")) == len(MODELS) * 2
    assert (trained.results / "benchmark_quick.md").read_text().count("| synthetic |") == len(MODELS) * 2
    history = rows(trained, "history.csv")
    assert len(history[history["model"].isin(MODELS)]) >= 2 * len(MODELS)
    assert len(list((trained.folder / "checkpoints").glob("*.pt"))) >= len(MODELS)
    assert not list(trained.folder.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_benchmark_writes_the_slices_of_every_run(trained):
    slices = rows(trained, "slices.csv")
    assert set(slices["slice"]) == {"all users", "short-history users", "rare target items"}
    data = trained.store.dataset(trained.configs[0])
    for model in MODELS:
        run = trained.store.run(trained.configs[0], model, 42)
        mine = slices[(slices["model"] == model) & (slices["config"] == run.config)].set_index("slice")
        assert mine.loc["all users", "ndcg@10"] == run.metrics["test"]["ndcg@10"]
        rare = data.item_counts[data.eval_split("test", 1, False).targets] <= trained.base["cold_item_max_count"]
        assert mine.loc["rare target items", "users"] == int(rare.sum())
        rare_ranks = run.ranks["test"][rare]
        assert mine.loc["rare target items", "hr@10"] == pytest.approx((rare_ranks < 10).double().mean().item())


def test_ablation_shares_the_benchmark_run(trained):
    H.ablation_stage(trained.store, trained.configs)
    ablation = rows(trained, "ablation.csv")
    assert len(ablation) == 4 and set(ablation["model"]) == {"HoloMamba", "Mamba-ItemOnly"}
    bench = rows(trained, "benchmark.csv")
    pick = lambda t: t[(t["model"] == "HoloMamba") & (t["split"] == "test")].iloc[0]  # noqa: E731
    assert pick(ablation)["config"] == pick(bench)["config"] and pick(ablation)["ndcg@10"] == pick(bench)["ndcg@10"]


def test_grid_logs_each_trial_once_and_skips_finished_trials(trained):
    best = H.grid_stage(trained.store, trained.configs)
    grid = pd.read_csv(trained.store.grid_csv)
    assert len(grid) == 2 and grid["trial"].is_unique and grid["dropout"].tolist() == [0.1, 0.3]
    assert json.loads((trained.results / "grid_best.json").read_text())["synthetic"]["valid_ndcg@10"] == \
        grid["valid_ndcg@10"].max() == best[0]["valid_ndcg@10"]
    # a fresh process (a new store) finds every trial in the log and trains nothing
    checkpoints = sorted((trained.folder / "checkpoints").glob("*.pt"))
    H.grid_stage(H.RunStore(trained.base), trained.configs)
    pd.testing.assert_frame_equal(pd.read_csv(trained.store.grid_csv), grid)
    assert sorted((trained.folder / "checkpoints").glob("*.pt")) == checkpoints


def test_grid_with_more_trials_trains_only_the_new_ones(tmp_path, tiny):
    base = H.config(**tiny, grid="attribute_mode=first,all", grid_max_trials=1)
    H.grid_stage(H.RunStore(base), [base])
    assert len(pd.read_csv(tmp_path / "results" / "grid.csv")) == 1
    wider = base.replace(grid_max_trials=0)
    store = H.RunStore(wider)
    H.grid_stage(store, [wider])
    table = pd.read_csv(tmp_path / "results" / "grid.csv")
    assert table["attribute_mode"].tolist() == ["first", "all"] and len(store.runs) == 1


def test_grid_log_widens_its_header_for_a_new_grid(tmp_path):
    path = tmp_path / "grid.csv"
    H.append_csv_row(path, {"trial": "a", "dropout": 0.1})
    H.append_csv_row(path, {"trial": "b", "lr": 0.002, "dropout": 0.2})
    table = pd.read_csv(path)
    assert list(table.columns) == ["trial", "dropout", "lr"]
    assert table["trial"].tolist() == ["a", "b"] and table["dropout"].tolist() == [0.1, 0.2]
    assert table["lr"].isna().tolist() == [True, False]


def test_compression_and_cold_start(trained):
    H.compression_stage(trained.store, trained.configs)
    compression = rows(trained, "compression.csv")
    assert compression["k"].tolist() == [1, 2, 2] and compression["tokens_per_user"].tolist() == [16, 8, 8]
    assert compression["bundling"].tolist() == ["none", "untrained", "trained"]
    # k = 1 is the plain model: its test metrics over 16 items equal a direct evaluation of the same weights
    run = trained.store.run(trained.configs[0], "HoloMamba", 42)
    model = trained.store.model(run)
    data = trained.store.dataset(trained.configs[0])
    split = data.eval_split("test", 16, H.excludes_seen(trained.configs[0], data))
    direct = H.full_ranking_metrics(H.rank_targets(model, split))
    assert compression.loc[0, "ndcg@10"] == direct["ndcg@10"]
    cold = rows(trained, "cold_start.csv")
    assert set(cold["model"]) == set(MODELS)
    assert (cold[cold["slice"] == "all users"]["users"] == 600).all()
    # the all-users slice is the run's own test metrics
    holo = cold[(cold["model"] == "HoloMamba") & (cold["slice"] == "all users")].iloc[0]
    assert holo["ndcg@10"] == run.metrics["test"]["ndcg@10"]


def test_efficiency_rows(trained):
    H.efficiency_stage(H.RunStore(trained.base.replace(efficiency_mixers="mamba,mamba2")), trained.configs)
    efficiency = rows(trained, "efficiency.csv")
    assert len(efficiency) == 4 and (efficiency["max_len"] == 16).all()
    assert efficiency.set_index("model")["stream_mode"].to_dict() == {
        "HoloMamba": "recurrent state", "HoloMamba (Mamba-2)": "recurrent state", "SASRec": "recompute window",
        "GRU4Rec": "recurrent state"}
    assert efficiency.set_index("model")["mixer"].fillna("").to_dict() == {
        "HoloMamba": "mamba", "HoloMamba (Mamba-2)": "mamba2", "SASRec": "", "GRU4Rec": ""}
    catalog = rows(trained, "efficiency_catalog.csv")
    assert catalog["softmax"].tolist() == ["full", "sampled (256)"] and (catalog["n_items"] == 500).all()


def test_efficiency_skips_a_row_that_does_not_fit(trained, monkeypatch, capsys):
    real = H.measure_model

    def oom_for_sasrec(name, cfg, device):
        if name == "SASRec":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.80 GiB")
        return real(name, cfg, device)

    monkeypatch.setattr(H, "measure_model", oom_for_sasrec)
    rows = H.efficiency_stage(trained.store, trained.configs)
    sasrec = [r for r in rows if r.get("model") == "SASRec"]
    assert sasrec and sasrec[0]["skipped"].startswith("out of memory") and "train_seqs_per_s" not in sasrec[0]
    assert all(r["skipped"] == "" for r in rows if r.get("model") == "HoloMamba")
    assert "efficiency: skipped" in capsys.readouterr().err


def test_efficiency_keeps_batch_times_length_constant_at_long_lengths(trained):
    base = trained.base.replace(efficiency_lengths="16,64", efficiency_tokens=512, efficiency_batch=64,
                                efficiency_catalogs="300")
    rows = H.efficiency_stage(H.RunStore(base), [])
    assert {(r["max_len"], r["batch"]) for r in rows if "model" in r} == {(16, 32), (64, 8)}


def test_stats_stage_counts(trained, capsys):
    (stats,) = H.stats_stage(trained.store, trained.configs)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == stats
    data = trained.store.dataset(trained.configs[0])
    assert stats == {"dataset": "synthetic", "users": data.n_users, "items": data.n_items,
                     "interactions": sum(len(s) for s in data.sequences), "attributes": 15,
                     "attributes_per_item": 1.0, "items_without_attributes": 0.0, "attribute_fields": 1}


def test_figures_are_drawn_from_the_result_files(trained):
    H.ablation_stage(trained.store, trained.configs)
    H.compression_stage(trained.store, trained.configs)
    H.grid_stage(trained.store, trained.configs)
    written = H.plot_figures(trained.base)
    assert {p.name for p in written} >= {"learning_curves_synthetic.png", "ablation.png", "compression.png",
                                         "grid_search.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_runs_stages_and_resumes_the_stores_runs(trained, capsys):
    """main() on the fixture's folder with --resume: the benchmark runs are found, not retrained."""
    argv = [f"--{k}={v}" for k, v in trained.overrides.items()] + ["--stage=benchmark", "--resume"]
    stamps = {p: p.stat().st_mtime_ns for p in (trained.folder / "checkpoints").glob("*.pt")}
    assert H.main(argv) == 0
    assert capsys.readouterr().err.count("resumed from") == len(MODELS)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    bench = rows(trained, "benchmark.csv")
    assert len(bench[bench["preset"] == "quick"]) == len(MODELS) * 2


def test_main_stats_and_data_errors(tmp_path, capsys):
    assert H.main(["--stage=stats", "--dataset=synthetic", f"--figures_dir={tmp_path / 'f'}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["users"] == 600
    assert not (tmp_path / "f").exists()  # the stats stage draws no figures
    assert H.main(["--stage=stats", f"--dataset=csv:{tmp_path / 'none'}"]) == 2
    assert "not found" in capsys.readouterr().err


def test_memory_stage_needs_memory_len(tiny):
    assert H.main(["--stage=memory", "--dataset=synthetic", f"--results_dir={tiny['results_dir']}"]) == 2


def test_sampled_softmax_training_runs(tiny):
    cfg = H.config(**{**tiny, "epochs": 1, "num_negatives": 16, "train_window": "random"})
    run = H.RunStore(cfg).run(cfg, "HoloMamba", 0)
    assert run.history[0]["loss"] > 0 and torch.isfinite(torch.tensor(run.history[0]["loss"]))


def test_a_default_run_leaves_the_paper_results_byte_identical(tmp_path, monkeypatch):
    """Run from a copy of the repository's layout: results/paper/ and the top-level grid log stay byte for byte
    as they were; the run writes under results/synthetic/default/ and draws its figures from those files only."""
    import hashlib
    import shutil

    from conftest import ROOT, TINY

    shutil.copytree(ROOT / "results" / "paper", tmp_path / "results" / "paper")
    shutil.copy(ROOT / "grid_search_results.csv", tmp_path / "grid_search_results.csv")

    def digest():
        files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "synthetic" not in p.parts)
        return {p.relative_to(tmp_path): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    before = digest()
    monkeypatch.chdir(tmp_path)
    argv = [f"--{k}={v}" for k, v in TINY.items()] + ["--dataset=synthetic", "--stage=benchmark,grid", "--epochs=1",
                                                       "--models=SASRec", "--grid=dropout=0.1", "--grid_max_trials=1"]
    assert H.main(argv) == 0
    assert digest() == before
    run = tmp_path / "results" / "synthetic" / "default"
    assert {"benchmark.csv", "accuracy.csv", "grid_search_results.csv"} <= {p.name for p in run.iterdir()}
    assert {p.name for p in (run / "figures").iterdir()} == {"learning_curves_synthetic.png", "grid_search.png",
                                                           "grid_trials_synthetic.png"}
    assert len(list((tmp_path / "checkpoints" / "synthetic" / "default").glob("*.pt"))) == 2
