"""Recommendations from a trained model and from its checkpoint: raw ids in and out, known and new users,
streaming observe(), many users in batches, the recommend stage, and exclude_seen=auto."""
import numpy as np
import pandas as pd
import pytest
import torch

import HoloMambaRec as H

CYCLE = 40


def cycle_frame(users=240, length=12, seed=0):
    """Every user walks the same cycle of items i0 -> i1 -> ... -> i39 -> i0 from a random start: the next item
    after i_j is always i_{j+1}, so a trained model's best recommendation is known. No user repeats an item."""
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{(start + t) % CYCLE}", t) for u, start in enumerate(rng.integers(0, CYCLE, users))
            for t in range(length)]
    return pd.DataFrame(rows, columns=["user", "item", "time"])


@pytest.fixture(scope="module")
def trained():
    data = H.load_dataset(cycle_frame(), name="cycle", min_user_count=1, min_item_count=1)
    torch.manual_seed(0)
    model = H.build_model("GRU4Rec", data, d_model=32, n_layers=1, max_len=8, epochs=15, lr=1e-2, dropout=0.0,
                          device="cpu")
    result = H.fit(model, data)
    model.load_state_dict(result.best_state)
    return data, model.eval()


def test_recommend_returns_the_known_next_item_as_raw_ids(trained):
    data, model = trained
    assert not data.has_repeats and model.excluding_seen() is True  # auto: no user repeats an item
    recs = model.recommend(history=["i5", "i6", "i7"], k=3)
    assert recs[0][0] == "i8" and len(recs) == 3 and recs[0][1] >= recs[1][1] >= recs[2][1]
    row = data.index.row("u3")
    last = data.raw_items[data.sequences[row][-1] - 1]
    assert model.recommend(user="u3", k=1)[0][0] == f"i{(int(last[1:]) + 1) % CYCLE}"
    # seen items are left out by default, kept with exclude_seen=False
    seen = {data.raw_items[i - 1] for i in data.sequences[row]}
    assert not seen & {item for item, _ in model.recommend(user="u3", k=CYCLE)}
    assert len(model.recommend(user="u3", k=CYCLE, exclude_seen=False)) == CYCLE
    with pytest.raises(H.DataError, match="unknown item id"):
        model.recommend(history=["i5", "nope"])
    assert model.recommend(history=["i5", "nope"], skip_unknown=True, k=1)[0][0] == "i6"
    with pytest.raises(H.DataError, match="unknown user 'x'"):
        model.recommend(user="x")


def test_recommend_many_equals_one_by_one(trained):
    data, model = trained
    users = ["u0", "u7", "u19"]
    table = model.recommend_many(users, k=4, batch_size=2)
    assert list(table.columns) == ["user", "rank", "item", "score"] and len(table) == 12
    for user in users:
        mine = table[table["user"] == user]
        expected = model.recommend(user=user, k=4)
        assert mine["item"].tolist() == [i for i, _ in expected]
        assert mine["score"].tolist() == pytest.approx([s for _, s in expected], abs=1e-5)


@pytest.mark.parametrize("name", ["GRU4Rec", "HoloMamba", "SASRec"])
def test_observe_folds_a_new_interaction_in(name):
    data = H.load_dataset(cycle_frame(users=60), name="cycle", min_user_count=1, min_item_count=1)
    torch.manual_seed(1)
    model = H.build_model(name, data, d_model=16, n_layers=1, d_state=8, max_len=16, device="cpu").eval()
    before = len(data.index.histories[data.index.row("u2")])
    recs = model.observe("u2", "i3", k=5)
    assert len(model.index.histories[model.index.row("u2")]) == before + 1
    again = model.recommend(user="u2", k=5)  # the full re-read of the grown history gives the same top 5
    assert [i for i, _ in recs] == [i for i, _ in again]
    assert [s for _, s in recs] == pytest.approx([s for _, s in again], abs=1e-4)
    recs = model.observe("u2", "i4", k=5)  # a second step from the cached state
    assert [i for i, _ in recs] == [i for i, _ in model.recommend(user="u2", k=5)]
    new = model.observe("newcomer", "i10", k=2)  # an unknown user starts an empty history
    assert [i for i, _ in new] == [i for i, _ in model.recommend(history=["i10"], k=2)]


def test_checkpoint_keeps_raw_ids_histories_and_fingerprint(trained, tmp_path):
    data, model = trained
    path = H.save(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["index"]["fingerprint"] == data.index.fingerprint and len(payload["index"]["items"]) == CYCLE
    loaded = H.load(path, device="cpu")
    assert loaded.index.items == list(data.raw_items) and loaded.index.users == list(data.raw_users)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.index.histories, data.sequences))
    assert loaded.recommend(user="u11", k=5) == model.recommend(user="u11", k=5)
    # the fingerprint changes with the data
    other = H.load_dataset(cycle_frame(seed=1), name="cycle", min_user_count=1, min_item_count=1)
    assert other.index.fingerprint != data.index.fingerprint
    # a model built on a bare catalog has no raw ids: recommend says so
    bare = H.build_model("GRU4Rec", H.catalog_only(10), d_model=8, device="cpu")
    with pytest.raises(H.DataError, match="no raw-id index"):
        bare.recommend(history=["1"])


def test_recommend_stage(trained, tmp_path, capsys):
    data, model = trained
    path = H.save(model, tmp_path / "m.pt")
    assert H.main(["--stage=recommend", f"--checkpoint={path}", "--history=i20,i21", "--k=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "item", "score"] and out[1].split()[:2] == ["1", "i22"]
    assert H.main(["--stage=recommend", f"--checkpoint={path}", "--user=u5", "--k=1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == model.recommend(user="u5", k=1)[0][0]
    users = tmp_path / "users.csv"
    users.write_text("user\nu1\nu2\nu3\n")
    assert H.main(["--stage=recommend", f"--checkpoint={path}", f"--users_file={users}", "--k=3",
                   f"--results_dir={tmp_path / 'out'}"]) == 0
    table = pd.read_csv(tmp_path / "out" / "recommendations.csv", dtype=str)
    assert len(table) == 9 and table["user"].tolist() == ["u1"] * 3 + ["u2"] * 3 + ["u3"] * 3
    assert table[table["user"] == "u2"]["item"].tolist() == [i for i, _ in model.recommend(user="u2", k=3)]
    for argv, phrase in [([], "needs --checkpoint"), ([f"--checkpoint={path}"], "needs --user"),
                         ([f"--checkpoint={path}", "--user=ghost"], "unknown user 'ghost'"),
                         ([f"--checkpoint={tmp_path / 'no.pt'}", "--user=u1"], "no such checkpoint")]:
        assert H.main(["--stage=recommend", *argv]) == 2
        assert phrase in capsys.readouterr().err


def test_exclude_seen_auto_follows_repeats_and_is_recorded(tiny, tmp_path, capsys):
    repeats = cycle_frame(users=40, length=50)  # 50 steps on a 40-item cycle: every user repeats items
    assert H.load_dataset(repeats, min_user_count=1, min_item_count=1).has_repeats
    cfg = H.config(**tiny)
    store = H.RunStore(cfg)
    run = store.run(cfg, "SASRec", 0)
    assert run.cfg["exclude_seen"] == "false"  # the synthetic users repeat items
    assert "exclude_seen=auto -> false: some user repeats an item" in capsys.readouterr().err
    assert H.metric_rows(run)[0]["exclude_seen"] == "false"
    forced = store.run(cfg.replace(exclude_seen="true"), "SASRec", 0)
    assert forced.cfg["exclude_seen"] == "true" and forced.config != run.config
