"""The public Python API: load_dataset, build_model, fit, evaluate, save / load; reproducibility; the RunStore
(memo, checkpoints, run records, --resume)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import HoloMambaRec as H

SMALL = {"d_model": 16, "n_layers": 1, "d_state": 8, "max_len": 10, "epochs": 2, "device": "cpu", "dropout": 0.1}


@pytest.fixture(scope="module")
def synthetic():
    return H.load_dataset("synthetic")


def test_load_dataset_by_name_config_or_dataframe(synthetic):
    assert synthetic.name == "synthetic" and synthetic.n_users == 600
    assert H.load_dataset(H.config("synthetic")).sequences[5].tolist() == synthetic.sequences[5].tolist()
    frame = pd.DataFrame({"user": ["a"] * 4 + ["b"] * 3, "item": ["x", "y", "z", "x", "y", "z", "y"],
                          "time": [1, 2, 3, 4, 1, 2, 3]})
    data = H.load_dataset(frame, attributes={"x": ["red"], "y": ["blue", "big"]}, name="toy",
                          min_user_count=1, min_item_count=1, attribute_mode="all")
    assert data.name == "frame:toy" and (data.n_users, data.n_items, data.n_interactions) == (2, 3, 7)
    assert data.sequences[0].tolist() == [1, 2, 3, 1]  # items x, y, z renumbered 1, 2, 3 in time order
    assert data.item_attributes[1:, :2].tolist() == [[2, 0], [3, 4], [1, 0]]  # z has none: id 1
    with pytest.raises(H.DataError, match="lacks the column"):
        H.load_dataset(frame.rename(columns={"time": "when"}))
    with pytest.raises(H.ConfigError, match="--min_user_count=-1"):
        H.load_dataset("synthetic", min_user_count=-1)


def test_fit_returns_its_result_and_evaluate_reports_the_best_weights(synthetic):
    torch.manual_seed(0)
    model = H.build_model("SASRec", synthetic, **SMALL)
    assert model.config["d_model"] == 16 and model.config["max_len"] == 10
    result = H.fit(model, synthetic, epochs=3, lr=3e-3)
    assert isinstance(result, H.FitResult) and [h["epoch"] for h in result.history] == [1, 2, 3]
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert result.stopped_by == "epochs" and result.epochs == 3
    assert result.best_epoch == max(result.history, key=lambda h: h["valid_ndcg@10"])["epoch"]
    last = H.evaluate(model, synthetic, "valid")  # fit leaves the last weights in the model
    assert last["ndcg@10"] == pytest.approx(result.history[-1]["valid_ndcg@10"], abs=1e-12)
    model.load_state_dict(result.best_state)
    best = H.evaluate(model, synthetic, "valid")
    assert best["ndcg@10"] == pytest.approx(max(h["valid_ndcg@10"] for h in result.history), abs=1e-12)
    test = H.evaluate(model, synthetic, "test")
    assert set(test) == set(H.METRIC_COLUMNS) and 0 <= test["ndcg@10"] <= test["hr@10"] <= 1


def test_weight_average_follows_its_recurrence_and_swaps_back_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = H.WeightAverage(model, epochs=1, steps_per_epoch=4)  # decay 1 - 1/4, and (1 + t) / (10 + t) early on
    expected = [p.detach().double().clone() for p in model.parameters()]
    for t in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # a stand-in for an optimizer step
        average.update()
        decay = min(0.75, (1 + t) / (10 + t))
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, model.parameters())]
    trained = [p.detach().clone() for p in model.parameters()]
    with average.applied():
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), trained))  # the trained weights, bit for bit
    state = average.state_dict()
    again = H.WeightAverage(model, epochs=1, steps_per_epoch=4)
    again.load_state_dict(state)
    assert again.updates == 8 and all(torch.equal(a, b) for a, b in zip(again.shadow, average.shadow))


def test_fit_with_weight_average_trains_the_same_weights_and_selects_the_average(synthetic):
    def train(average):
        torch.manual_seed(0)
        model = H.build_model("HoloMamba", synthetic, **SMALL)
        return model, H.fit(model, synthetic, epochs=3, lr=3e-3, weight_average=average)

    plain_model, plain = train(0.0)
    model, averaged = train(1.0)
    # the optimizer's trajectory is untouched: the same losses and the same last weights, bit for bit
    assert [h["loss"] for h in averaged.history] == [h["loss"] for h in plain.history]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain_model.state_dict().values()))
    # validation read the average, which is not the trained weights
    assert [h["valid_ndcg@10"] for h in averaged.history] != [h["valid_ndcg@10"] for h in plain.history]
    assert H.evaluate(model, synthetic, "valid")["ndcg@10"] == pytest.approx(plain.history[-1]["valid_ndcg@10"],
                                                                            abs=1e-12)
    model.load_state_dict(averaged.best_state)  # the kept weights are the averaged ones that validation scored best
    best = H.evaluate(model, synthetic, "valid")
    assert best["ndcg@10"] == pytest.approx(max(h["valid_ndcg@10"] for h in averaged.history), abs=1e-12)


@pytest.mark.parametrize("name", ["HoloMamba", "GRU4Rec"])
def test_same_seed_same_training(name, synthetic):
    def train(seed):
        torch.manual_seed(seed)
        return H.fit(H.build_model(name, synthetic, **SMALL), synthetic)

    a, b = train(7), train(7)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    c = train(8)
    assert [h["loss"] for h in c.history] != [h["loss"] for h in a.history]


def test_save_and_load_roundtrip(synthetic, tmp_path):
    torch.manual_seed(0)
    model = H.build_model("HoloMamba", synthetic, **SMALL)
    H.fit(model, synthetic, epochs=1)
    path = H.save(model, tmp_path / "m.pt", note="hello")
    payload = torch.load(path, weights_only=True)  # plain data: a malicious pickle could not run code
    assert payload["model"] == "HoloMamba" and payload["config"]["d_model"] == 16 and payload["note"] == "hello"
    assert payload["version"] == H.__version__ and payload["catalog"]["n_items"] == synthetic.n_items
    loaded = H.load(path, device="cpu")
    assert type(loaded) is H.HoloMamba and not loaded.training and loaded.scan_backend == "reference"
    assert H.evaluate(loaded, synthetic, "test") == H.evaluate(model, synthetic, "test")
    # a checkpoint trained with the CUDA kernel loads on a machine without it
    payload["config"]["scan_backend"] = "cuda"
    torch.save(payload, tmp_path / "gpu.pt")
    assert H.load(tmp_path / "gpu.pt", device="cpu").scan_backend == "reference"
    torch.save({"state_dict": payload["state_dict"], "config": payload["config"]}, tmp_path / "old.pt")
    with pytest.raises(H.DataError, match="old-format or foreign checkpoint: it lacks \\['catalog', 'model'\\]"):
        H.load(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(H.DataError, match="not a readable HoloMambaRec checkpoint"):
        H.load(tmp_path / "junk.pt")


def test_run_store_memoises_saves_and_resumes(tiny, tmp_path):
    cfg = H.config(**tiny)
    store = H.RunStore(cfg)
    run = store.run(cfg, "GRU4Rec", 3)
    assert store.run(cfg, "GRU4Rec", 3) is run  # memoised within the store
    # exclude_seen=auto resolves for the data before the run is hashed: synthetic users repeat items, so false
    assert run.cfg["exclude_seen"] == "false" and run.config == H.run_hash(cfg.replace(exclude_seen="false"))
    assert run.epochs == 2 and len(run.history) == 2
    record = json.loads((tmp_path / "results" / "runs" / f"{run.name}.json").read_text())
    assert record["metrics"] == run.metrics and record["config"] == run.config and "ranks" not in record
    checkpoint = tmp_path / "checkpoints" / f"{run.name}.pt"
    assert run.checkpoint == str(checkpoint) and torch.load(checkpoint, weights_only=True)["metrics"] == run.metrics
    # the module comes back from the checkpoint and ranks the test split as the run did
    model = store.model(run)
    data = store.dataset(cfg)
    assert torch.equal(H.rank_targets(model, data.eval_split("test", 10, exclude_seen=False)), run.ranks["test"])
    # a new store with resume reuses the finished run: nothing is trained or written again
    stamp = checkpoint.stat().st_mtime_ns
    again = H.RunStore(cfg.replace(resume=True)).run(cfg.replace(resume=True), "GRU4Rec", 3)
    assert again.metrics == run.metrics and again.history == run.history and again.config == run.config
    assert torch.equal(again.ranks["test"], run.ranks["test"]) and checkpoint.stat().st_mtime_ns == stamp
    # a different preset with the same hyper-parameters is the same run (the preset is not in the hash)
    assert H.run_hash(cfg.replace(preset="best", exclude_seen="false")) == run.config


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python API example, run as written (in an empty folder: it saves a checkpoint there)."""
    text = (H.Path(H.__file__).parent / "README.md").read_text()
    example = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md (Python API)", "exec"), namespace)
    best_epoch, ndcg = capsys.readouterr().out.split()
    assert 1 <= int(best_epoch) <= 2 and 0 <= float(ndcg) <= 1
    assert (tmp_path / "holomamba.pt").is_file() and isinstance(namespace["model"], H.HoloMamba)
    assert len(torch.load(tmp_path / "holomamba.pt", weights_only=True)["history"]) == 2
