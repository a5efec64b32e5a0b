"""RAMRec: adaptive retrieval depth, no retrieval of entries at or after the query position, bank writes and
pruning, the memory-free path, positions threaded from the data, and an end-to-end run."""
import numpy as np
import pytest
import torch

import HoloMambaRec as H

N_ITEMS, N_USERS, L = 30, 10, 12


def ramrec(seed=0, **extra):
    """A small RAMRec without dropout (training and evaluation forwards then differ only by the bank)."""
    cfg = H.resolve_config({"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": L, "dropout": 0.0,
                            "ramrec_slots": 8, "ramrec_writes": 4, "ramrec_k_min": 2, "ramrec_k_max": 4, **extra},
                           "synthetic")
    torch.manual_seed(seed)
    return H.RAMRec(cfg, H.catalog_only(N_ITEMS)._replace(n_users=N_USERS)).eval()


def opened(model, seed=5):
    """The read path switched on, as training would: out (zero at initialisation) random."""
    with torch.no_grad():
        model.out.weight.copy_(torch.randn(model.out.weight.shape, generator=torch.Generator().manual_seed(seed)) / 4)
    return model


def hidden(model, seq, users=None, ends=None):
    return model(H.Batch(seq, users=users, ends=ends)).hidden


def batch(seed=0, users=(3, 7, 1)):
    """(seq, users, ends): random items, row 1 left-padded to 6 real items; windows end at 20, 6, 15."""
    seq = torch.randint(1, N_ITEMS + 1, (len(users), L), generator=torch.Generator().manual_seed(seed))
    seq[1, :6] = 0
    return seq, torch.tensor(users), torch.tensor([20, 6, 15])[:len(users)]


def fill_bank(model, users, tags, seed=1):
    """Random states in the users' banks, tagged `tags` (a list of per-user tag lists); other slots empty."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for u, user_tags in zip(users.tolist(), tags):
            model.bank[u] = torch.randn(model.bank.shape[1:], generator=g)
            model.tags[u] = -1
            model.tags[u, :len(user_tags)] = torch.tensor(user_tags)


def positions(seq, ends):
    return (ends - seq.shape[1])[:, None] + torch.arange(seq.shape[1])


def test_adaptive_depth_range_and_extremes():
    k_min, k_max, slots = 2, 6, 10
    g = torch.Generator().manual_seed(0)
    scores = 3 * torch.randn(500, slots, generator=g)
    eligible = torch.rand(500, slots, generator=g) < 0.5
    n = eligible.sum(-1)
    depth = H.adaptive_depth(scores, eligible, k_min, k_max)
    assert (depth <= torch.clamp(n, max=k_max)).all()
    assert (depth[n >= k_min] >= k_min).all() and (depth[n < k_min] == n[n < k_min]).all()
    every = torch.ones(1, slots, dtype=torch.bool)
    one_hot = 100.0 * torch.eye(slots)[:1]  # zero entropy
    assert H.adaptive_depth(one_hot, every, k_min, k_max).item() == k_min
    assert H.adaptive_depth(torch.zeros(1, slots), every, k_min, k_max).item() == k_max  # uniform: entropy 1
    assert H.adaptive_depth(torch.zeros(1, slots), every & (torch.arange(slots) < 4), k_min, k_max).item() == 4


def test_adaptive_depth_grows_with_entropy():
    """Softmax entropy grows with the temperature, so the depth never decreases as the scores flatten."""
    scores = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    every = torch.ones_like(scores, dtype=torch.bool)
    depths = torch.stack([H.adaptive_depth(scores / t, every, 1, 8) for t in (1e-4, 0.01, 0.1, 0.3, 1, 3, 10, 100)])
    assert (depths[1:] >= depths[:-1]).all()
    assert (depths[0] == 1).all() and (depths[-1] == 8).all()


@pytest.mark.parametrize("training", [False, True])
def test_entries_at_or_after_the_query_position_are_never_retrieved(training):
    """A bank whose tags are all >= every query position leaves the output equal to the memory-free path;
    one entry tagged t changes exactly the positions p > t."""
    model = opened(ramrec().train(training))
    seq, users, ends = batch()
    last = ends - 1  # absolute position of each row's last column
    with torch.no_grad():
        plain = hidden(model, seq)
        fill_bank(model, users, [list(range(e, e + 8)) for e in last.tolist()])
        torch.testing.assert_close(hidden(model, seq, users, ends), plain, rtol=0, atol=1e-6)
        t = (last - 5).tolist()  # one entry per user, 5 positions before the end of the window
        fill_bank(model, users, [[x] for x in t])
        out = hidden(model, seq, users, ends)
    later = positions(seq, ends) > torch.tensor(t)[:, None]
    changed = (out - plain).abs().amax(-1) > 1e-4
    assert torch.equal(changed, later & seq.gt(0))


def test_training_forward_writes_the_batch_users_at_the_expected_positions():
    model = ramrec().train()
    seq, users, ends = batch()
    with torch.no_grad():
        plain = hidden(model, seq)
        hidden(model, seq, users, ends)
    # stride = L // writes = 3: columns 11, 8, 5, 2 back from the last; row 1 is padding before column 6
    expected = [{e - L + c for c in (11, 8, 5, 2) if seq[r, c] > 0} for r, e in enumerate(ends.tolist())]
    assert expected[1] == {5, 2}  # row 1 (window ends at 6) keeps only its two real columns, 11 and 8
    others = [u for u in range(N_USERS) if u not in users.tolist()]
    assert (model.tags[others] == -1).all() and (model.bank[others] == 0).all()
    for r, u in enumerate(users.tolist()):
        stored = model.tags[u][model.tags[u] >= 0]
        assert set(stored.tolist()) == expected[r] and len(stored) == len(expected[r])
        for slot in torch.nonzero(model.tags[u] >= 0).flatten().tolist():  # the state of that position
            col = model.tags[u, slot].item() - (ends[r].item() - L)
            torch.testing.assert_close(model.bank[u, slot], plain[r, col], rtol=0, atol=1e-6)
    with torch.no_grad():  # the same window again refreshes its entries instead of adding copies
        hidden(model, seq, users, ends)
    assert [(model.tags[u] >= 0).sum().item() for u in users.tolist()] == [len(e) for e in expected]


def test_evaluation_never_writes():
    model = ramrec().eval()
    seq, users, ends = batch()
    fill_bank(model, users, [[0, 3], [1], [2, 4, 6]])
    before = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        hidden(model, seq, users, ends)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())


def test_full_bank_replaces_empty_then_lowest_retention_entries():
    """Retention = quality + usage, both decayed by 0.9 at a write; the new entries start at usage 1."""
    model = ramrec(ramrec_slots=4, ramrec_writes=2, ramrec_k_max=2)
    g = torch.Generator().manual_seed(2)
    seq, users, ends = torch.randint(1, N_ITEMS + 1, (2, L), generator=g), torch.tensor([0, 1]), torch.tensor([20, 15])
    states = torch.randn(2, L, 16, generator=g)
    with torch.no_grad():
        model.tags[0] = torch.tensor([0, 1, 2, 3])  # full: the two lowest scores are slots 1 and 3
        model.usage[0], model.quality[0] = torch.tensor([5.0, 0.5, 3.0, 1.0]), torch.tensor([0.0, 0.0, 0.0, 0.9])
        model.tags[1] = torch.tensor([0, -1, 1, 2])  # one empty slot: it goes first, then slot 0 (lowest)
        model.usage[1] = torch.tensor([0.1, 9.0, 3.0, 2.0])
        model.quality[1] = 0.0
        model.write(users, positions(seq, ends), seq, states)
    assert sorted(model.tags[0].tolist()) == [0, 2, 13, 19]  # positions 20 - 12 + columns 11 and 5 (stride 6)
    assert model.tags[0, [0, 2]].tolist() == [0, 2]
    torch.testing.assert_close(model.usage[0, [0, 2]], torch.tensor([4.5, 2.7]))
    assert model.usage[0, [1, 3]].tolist() == [1.0, 1.0] and model.quality[0, [1, 3]].tolist() == [0.0, 0.0]
    assert model.tags[1, 2:].tolist() == [1, 2] and sorted(model.tags[1, :2].tolist()) == [8, 14]
    for slot in (1, 3):  # the stored vector is the state of the tagged position
        col = model.tags[0, slot].item() - (ends[0].item() - L)
        torch.testing.assert_close(model.bank[0, slot], states[0, col], rtol=0, atol=0)


def test_at_initialisation_it_is_sasrec_with_a_full_bank():
    """out starts at zero: with SASRec's weights and a full bank, RAMRec's scores equal SASRec's to 1e-6 (and a
    training forward, which also writes the bank, gives the same states)."""
    model = ramrec(seed=2)
    sasrec = H.SASRec(H.config("synthetic", d_model=16, n_layers=1, n_heads=2, max_len=L, dropout=0.0),
                      H.catalog_only(N_ITEMS)).eval()
    missing, unexpected = model.load_state_dict(sasrec.state_dict(), strict=False)
    assert not unexpected and set(missing) >= {"out.weight", "gate.weight", "query.weight", "bank"}
    seq, users, ends = batch(seed=6)
    fill_bank(model, users, [list(range(0, 19, 3)), [0, 1, 2], list(range(0, 14, 2))])
    with torch.no_grad():
        expected = sasrec.score_next(H.Batch(seq))
        torch.testing.assert_close(model.score_next(H.Batch(seq, users=users, ends=ends)), expected, rtol=0, atol=1e-6)
        assert (model.reads(H.Batch(seq, users=users, ends=ends))["share"] == 0).all()
        torch.testing.assert_close(hidden(model.train(), seq, users, ends), hidden(sasrec, seq), rtol=0, atol=1e-6)


def test_without_users_it_is_its_sasrec_encoder_and_padding_is_inert():
    model = opened(ramrec(seed=3))
    sasrec = H.SASRec(H.config("synthetic", d_model=16, n_layers=1, n_heads=2, max_len=L, dropout=0.0),
                      H.catalog_only(N_ITEMS)).eval()
    sasrec.load_state_dict(model.state_dict(), strict=False)
    seq, users, ends = batch(seed=4)
    fill_bank(model, users, [list(range(0, 19, 3)), [0, 1, 2], list(range(0, 14, 2))])
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, seq), hidden(sasrec, seq), rtol=0, atol=0)
        core = seq[:, -4:]  # the same last 4 items, fewer or more padding columns in front
        out = hidden(model, core, users, ends)[:, -1]
        for pad in (2, 8):
            padded = torch.cat([torch.zeros(3, pad, dtype=torch.long), core], 1)
            torch.testing.assert_close(hidden(model, padded, users, ends)[:, -1], out, rtol=0, atol=1e-5)
        assert (out - hidden(model, core)[:, -1]).abs().max() > 1e-4  # and the bank is read


def test_bf16_autocast_training_forward_stays_fp32():
    model = ramrec().train()
    seq, users, ends = batch()
    fill_bank(model, users, [[0, 5, 9], [1, 2], [3, 4, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hidden(model, seq, users, ends)
        loss = out.square().mean()
    loss.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.bank.dtype == torch.float32 and model.gate.weight.grad is not None


def test_model_positions_are_the_items_history_positions():
    """Column j of the inputs given with `ends` holds the item at history position ends - L + j, in training
    windows (ends - 1: the inputs stop one before the window) and in the valid / test splits."""
    data = H.load_dataset("synthetic")
    windows = H.TrainingWindows(data, 8, "cpu")
    ends = windows.window_ends("random", torch.Generator().manual_seed(0))
    cases = [(windows.cut(ends)[0], ends - 1)]
    for which in ("valid", "test"):
        split = data.eval_split(which, 8)
        assert torch.equal(split.users, torch.arange(data.n_users))
        cases.append((split.inputs, split.ends))
    for inputs, input_ends in cases:
        for u in range(0, data.n_users, 37):
            at = input_ends[u].item() - 8 + np.arange(8)
            real = at >= 0
            assert inputs[u].numpy()[real].tolist() == data.sequences[u][at[real]].tolist()
            assert (inputs[u].numpy()[~real] == 0).all()
    assert torch.equal(cases[1][1], data.train_lengths())  # valid inputs end before the validation item


def test_invalid_ramrec_config_names_the_key():
    for overrides, key in (({"ramrec_k_min": 0}, "ramrec_k_min"), ({"ramrec_k_max": 1}, "ramrec_k_max"),
                           ({"ramrec_slots": 4}, "ramrec_slots"), ({"ramrec_writes": 0}, "ramrec_writes")):
        with pytest.raises(H.ConfigError, match=key):
            H.resolve_config(overrides, "synthetic")


def test_ramrec_run_end_to_end(tiny):
    cfg = H.config(**tiny, train_window="random")
    store = H.RunStore(cfg)
    run = store.run(cfg, "RAMRec", 0)
    assert all(np.isfinite(v) for m in run.metrics.values() for v in m.values())
    assert all(np.isfinite(h["loss"]) for h in run.history)
    model, data = store.model(run), store.dataset(cfg)
    assert ((model.tags >= 0).sum(1) > 0).all()  # every user has memory entries
    # no entry was written at or past the end of the training inputs (the last training target's position)
    assert (model.tags < data.train_lengths()[:, None] - 1).all()
    # the checkpoint holds the bank: the model loaded from it ranks the test split as the run did
    split = data.eval_split("test", cfg["max_len"], H.excludes_seen(cfg, data))
    assert torch.equal(H.rank_targets(model, split, cfg), run.ranks["test"])


@pytest.mark.parametrize("mode", ["frozen", "all"])
def test_warm_start_begins_at_the_trained_sasrec_and_never_validates_below_it(tiny, mode):
    """RAMRec with warm_start starts from the SASRec run of the same seed (trained first), whose validation is
    epoch 0 of its history; the selected weights validate at least as well; frozen leaves SASRec's weights as
    they were. SASRec's run is the same whether warm_start is set or not (it is not an extension)."""
    cfg = H.config(**{**tiny, "epochs": 4}, train_window="random", patience=4, warm_start=mode)
    store = H.RunStore(cfg)
    assert store.run_key(cfg, "SASRec", 0) == store.run_key(cfg.replace(warm_start="off"), "SASRec", 0)
    assert store.run_key(cfg, "RAMRec", 0) != store.run_key(cfg.replace(warm_start="off"), "RAMRec", 0)
    run = store.run(cfg, "RAMRec", 0)
    base = store.run(cfg, "SASRec", 0)  # memoised: the run warm_start trained
    assert run.history[0]["epoch"] == 0 and [h["epoch"] for h in run.history[1:]] == list(range(1, run.epochs + 1))
    assert run.history[0]["valid_ndcg@10"] == pytest.approx(base.metrics["valid"]["ndcg@10"], abs=1e-6)
    assert run.metrics["valid"]["ndcg@10"] >= base.metrics["valid"]["ndcg@10"] - 1e-6
    ramrec, sasrec = store.model(run).state_dict(), store.model(base).state_dict()
    same = [torch.equal(ramrec[k], v) for k, v in sasrec.items()]
    if mode == "frozen":
        assert all(same)
    elif run.best_epoch > 0:
        assert not all(same)
    assert run.best_epoch > 0 or torch.equal(ramrec["out.weight"], torch.zeros_like(ramrec["out.weight"]))


def test_a_frozen_warm_start_cut_by_ctrl_c_continues_frozen(tiny, monkeypatch):
    """Ctrl-C during the fine-tuning, then --resume: the continued run still trains only RAMRec's own parameters."""
    cfg = H.config(**{**tiny, "epochs": 4}, train_window="random", patience=4, warm_start="frozen")
    base = H.RunStore(cfg).run(cfg, "SASRec", 0)
    real, calls = H.rank_targets, []

    def interrupt_in_epoch_2(*args, **kwargs):  # 1-2: SASRec reloaded, 3: epoch 0 (SASRec), 4: epoch 1, 5: epoch 2
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(H, "rank_targets", interrupt_in_epoch_2)
    with pytest.raises(H.Interrupted):
        H.RunStore(cfg).run(cfg, "RAMRec", 0)
    monkeypatch.setattr(H, "rank_targets", real)
    store = H.RunStore(cfg.replace(resume=True))
    run = store.run(cfg.replace(resume=True), "RAMRec", 0)
    assert [h["epoch"] for h in run.history] == list(range(run.epochs + 1)) and run.history[1]["epoch"] == 1
    ramrec, sasrec = store.model(run).state_dict(), store.model(base).state_dict()
    assert all(torch.equal(ramrec[k], v) for k, v in sasrec.items())
