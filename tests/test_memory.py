"""The holographic associative memory: keyed recall, gate, decay, padding, scan vs step, and its use in
HoloMamba (streaming equivalence, loss alignment)."""
import pytest
import torch
import torch.nn.functional as F

import HoloMambaRec as H


def open_memory(binding, d=512, slots=1, seed=0):
    """A memory whose gate is wide open and whose decay is 1, so writes add key ⊛ value exactly."""
    torch.manual_seed(seed)
    mem = H.HolographicMemory(d, slots, binding).double()
    with torch.no_grad():
        mem.gate.weight.zero_()
        mem.gate.bias.fill_(50.0)
        mem.decay_logit.fill_(50.0)
    return mem


@pytest.mark.parametrize("binding", ["fft", "bipolar"])
def test_keyed_recall_beats_chance_and_a_keyless_bundle(binding):
    """Write 4 items, read back with each write key: the recalled vector is closest to its own value
    (cosine > 0.3, every wrong value < 0.15). A keyless bundle of the values is one vector for every key,
    so it can point at no more than one of the 4 values."""
    mem, n = open_memory(binding), 4
    x = torch.randn(n, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    memory = torch.zeros(1, 1, 512, dtype=torch.float64)
    for i in range(n):
        memory = mem.write(memory, x[i:i + 1])
    keys, values = mem.keys(mem.write_key, x), mem.value(x)  # (n, 1, d), (n, d)
    recalled = mem.unbind_pair(H.rms_normalise(memory), keys)[:, 0]  # (n, d)
    sims = F.cosine_similarity(recalled.unsqueeze(1), values.unsqueeze(0), dim=-1)  # (read i, value j)
    assert (sims.diagonal() > 0.3).all()
    assert (sims - torch.diag(torch.full((n,), 9.0, dtype=torch.float64)) < 0.15).all()
    assert (sims.argmax(1) == torch.arange(n)).all()
    keyless = F.cosine_similarity(values.sum(0, keepdim=True), values, dim=-1)
    assert int((keyless.argmax() == torch.arange(n)).sum()) == 1  # the same guess for every key


def test_fft_keys_have_unit_modulus_and_bipolar_keys_are_signs():
    x = torch.randn(3, 64, dtype=torch.float64)
    fft = open_memory("fft", d=64, slots=2)
    spectrum = torch.fft.rfft(fft.keys(fft.write_key, x))
    torch.testing.assert_close(spectrum.abs(), torch.ones_like(spectrum.abs()), rtol=1e-5, atol=1e-5)
    bipolar = open_memory("bipolar", d=64, slots=2)
    assert set(bipolar.keys(bipolar.write_key, x).unique().tolist()) <= {-1.0, 1.0}


def test_closed_gate_writes_nothing_and_memory_decays_by_lambda():
    mem = H.HolographicMemory(16, slots=3).double()
    with torch.no_grad():
        mem.gate.weight.zero_()
        mem.gate.bias.fill_(-60.0)  # sigmoid(-60) ~ 1e-26: closed
        mem.decay_logit.copy_(torch.tensor([0.0, 1.0, -2.0]))
    start = torch.randn(2, 3, 16, dtype=torch.float64)
    memory = start
    for _ in range(5):
        memory = mem.write(memory, torch.randn(2, 16, dtype=torch.float64))
    lam = torch.sigmoid(torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(memory, start * lam.view(1, 3, 1) ** 5, rtol=1e-12, atol=1e-12)


def test_sequence_write_equals_step_writes_and_padding_is_inert():
    torch.manual_seed(0)
    mem = H.HolographicMemory(8, slots=2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.float64)
    memory, _, _ = mem.write_sequence(x, mask)
    for b in range(2):
        state = torch.zeros(1, 2, 8, dtype=torch.float64)
        for t in range(6):
            if mask[b, t]:
                state = mem.write(state, x[b:b + 1, t])
            torch.testing.assert_close(memory[b, t], state[0], rtol=1e-10, atol=1e-10)


def test_a_folded_start_continues_the_scan():
    """fold(x) is the scan's last memory, and scanning the rest from it gives the scan over everything."""
    torch.manual_seed(0)
    mem = H.HolographicMemory(8, slots=3).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 1, 1], [1] * 9], dtype=torch.float64)
    whole = mem.write_sequence(x, mask)[0]
    torch.testing.assert_close(mem.fold(x[:, :5], mask[:, :5]), whole[:, 4], rtol=1e-10, atol=1e-12)
    rest = mem.write_sequence(x[:, 5:], mask[:, 5:], start=mem.fold(x[:, :5], mask[:, :5]))[0]
    torch.testing.assert_close(rest, whole[:, 5:], rtol=1e-10, atol=1e-12)


def test_chunked_fold_and_recall_equal_the_whole_in_values_and_gradients():
    """fold_in_chunks and recall_miss, 3 positions at a time under activation checkpointing, against fold and
    reconstruction_loss over all 10 positions at once (fp64, 1e-10), with left padding."""
    torch.manual_seed(0)
    mem = H.HolographicMemory(8, slots=3).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 10], dtype=torch.float64)
    results = []
    for chunk in (3, None):
        if chunk:
            memory = mem.fold_in_chunks(x, mask, chunk)
            loss = mem.recall_miss(memory, x, mask, chunk)
        else:
            memory = mem.fold(x, mask)
            _, key, value = mem.writes(x)
            loss = mem.reconstruction_loss(memory[:, None], key, value, mask)
        writing = [mem.write_key.weight, mem.value.weight, mem.value.bias, mem.gate.weight, mem.decay_logit]
        grads = torch.autograd.grad(memory.square().sum() + loss, [x, *writing])
        results.append((memory, loss, grads))
    (m1, l1, g1), (m2, l2, g2) = results
    torch.testing.assert_close(m1, m2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_items_older_than_the_window_are_folded_in_without_gradient():
    """memory_writes=all: in training, the encoder input of the 8 older items carries no gradient (folded in under
    no_grad) and the window's 12 do; the memory at the window's positions still depends on the older items."""
    cfg, model = memory_model(memory_len=8, writes="all")
    opened(model).train()
    seen = []
    hook = model.emb_norm.register_forward_hook(lambda module, args, out: seen.append((out.shape[1], out.requires_grad)))
    seq = torch.randint(1, 41, (2, 21), generator=torch.Generator().manual_seed(2))
    out = model(H.Batch(seq[:, :-1], seq[:, 1:]))
    hook.remove()
    assert seen == [(8, False), (12, True)]
    H.next_item_loss(out, model.output_table(), cfg).backward()
    assert model.memory.write_key.weight.grad.abs().max() > 0


def test_older_items_alone_fill_the_memory_and_learn_through_it():
    """memory_writes=older: the memory is the fold of the 8 items older than the window of 12, with gradient
    (dropout 0 here), the same for each of the window's positions; the window's own items never enter it; the
    auxiliary loss reads the older items back."""
    cfg, model = memory_model(memory_len=8)
    opened(model).train()
    seq = torch.randint(1, 41, (2, 21), generator=torch.Generator().manual_seed(2))
    inputs = seq[:, :-1]
    x, memory, aux = model.memory_stream(H.Batch(inputs))
    assert x.shape == (2, 12, 16) and memory.shape == (2, 1, 4, 16)
    older = inputs[:, :8]
    torch.testing.assert_close(memory[:, 0], model.memory.fold(model.embed(older), older.gt(0).float()))
    _, key, value = model.memory.writes(model.embed(older))
    torch.testing.assert_close(aux, cfg["memory_loss"] * model.memory.reconstruction_loss(
        memory, key, value, older.gt(0).float()), rtol=1e-6, atol=1e-7)
    changed = inputs.clone()
    changed[:, 8:] = torch.randint(1, 41, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.memory_stream(H.Batch(changed))[1], memory)  # the window writes nothing
    out = model(H.Batch(inputs, seq[:, 1:]))
    H.next_item_loss(out, model.output_table(), cfg).backward()
    assert model.memory.write_key.weight.grad.abs().max() > 0 and model.memory.gate.weight.grad.abs().max() > 0
    short = model.memory_stream(H.Batch(inputs[:, -12:]))  # nothing older: an empty memory, no auxiliary loss
    assert short[2] == 0.0 and not short[1].any()


def test_streamed_memory_holds_the_items_that_left_the_window():
    """Step by step, the item leaving the window of 12 enters the memory: after 19 items the streamed memory is
    the fold of the first 7 and the state keeps the last 12 ids; up to 12 items the scores equal the forward's."""
    _, model = memory_model(memory_len=8)
    opened(model)
    seq = torch.randint(1, 41, (2, 19), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(seq.shape[1]):
            scores, state = model.step(state, seq[:, t])
            if t < 12:
                torch.testing.assert_close(scores, model.score_next(H.Batch(seq[:, :t + 1])), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(state[-2], model.memory.fold(model.embed(seq[:, :7]), torch.ones(2, 7)),
                                   rtol=1e-5, atol=1e-6)
    assert torch.equal(state[-1], seq[:, -12:])


def test_older_memory_slots_start_on_spread_horizons():
    """Slot s starts with λ_s = 1 - 1/h_s, h from 4 items to memory_len geometrically; the earlier design 0.95."""
    _, model = memory_model(memory_len=1024, max_len=12)
    horizons = 4 * 256 ** (torch.arange(4) / 3)  # 4 slots: 4, 25.4, 161.3, 1024 items
    torch.testing.assert_close(model.memory.decay()[:, 0], 1 - 1 / horizons, rtol=1e-5, atol=1e-6)
    _, earlier = memory_model(memory_len=1024, writes="all")
    torch.testing.assert_close(earlier.memory.decay()[:, 0], torch.full((4,), torch.sigmoid(torch.tensor(3.0)).item()))


def memory_model(memory_len=0, max_len=12, seed=0, writes="older"):
    cfg = H.resolve_config({"d_model": 16, "n_layers": 2, "max_len": max_len, "dropout": 0.0, "memory_slots": 4,
                            "memory_len": memory_len, "memory_writes": writes, "scan_backend": "parallel"}, "synthetic")
    torch.manual_seed(seed)
    return cfg, H.build_model("HoloMamba", H.catalog_only(40), cfg).eval()


def test_memory_windows_train_on_the_encoder_window():
    """A memory model's random training windows (max_len + memory_len items) end anywhere from the first full
    encoder window, as the window alone's do: a user with 30 items gets windows ending anywhere in [13, 30]."""
    data = H.load_dataset("synthetic")
    plain, memory = H.TrainingWindows(data, 12, "cpu"), H.TrainingWindows(data, 20, "cpu", trained=12)
    g = torch.Generator().manual_seed(0)
    ends = torch.stack([memory.window_ends("random", g) for _ in range(200)])
    low = memory.lengths.clamp(max=13)
    assert (ends >= low).all() and (ends <= memory.lengths).all()
    assert torch.equal(ends.amin(0), low) and torch.equal(ends.amax(0), memory.lengths)
    inputs, targets = memory.cut(ends[0])
    assert inputs.shape == (data.n_users, 20)
    torch.testing.assert_close(targets[:, -12:], plain.cut(ends[0])[1])


def test_streaming_steps_with_memory_equal_the_full_forward():
    cfg, model = memory_model(writes="all")
    opened(model)
    seq = torch.randint(1, 41, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        state, table = model.init_state(1), model.output_table()[1:]
        for t in range(seq.shape[1]):
            scores, state = model.step(state, seq[:, t], table)
            torch.testing.assert_close(scores, model.score_next(H.Batch(seq[:, :t + 1])), rtol=1e-4, atol=1e-4)


def opened(model, seed=1):
    """The memory read switched on, as training would: memory_out (zero at initialisation) random."""
    with torch.no_grad():
        model.memory_out.weight.copy_(torch.randn(model.memory_out.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@pytest.mark.parametrize("writes", ["older", "all"])
def test_memory_model_at_initialisation_is_its_window_alone(writes):
    """memory_out starts at zero: with the window model's weights, the window + memory model gives the same
    scores to 1e-6, in the full forward (which reads 8 older items) and step by step."""
    cfg, memory = memory_model(memory_len=8, writes=writes)
    window = H.build_model("HoloMamba", H.catalog_only(40), cfg.replace(memory_slots=0, memory_len=0)).eval()
    missing, unexpected = memory.load_state_dict(window.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("memory") for k in missing)
    seq = torch.randint(1, 41, (4, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(memory.score_next(H.Batch(seq)), window.score_next(H.Batch(seq[:, -12:])),
                                   rtol=0, atol=1e-6)
        state = memory.init_state(4)
        base = window.init_state(4)
        for t in range(seq.shape[1]):
            scores, state = memory.step(state, seq[:, t])
            expected, base = window.step(base, seq[:, t])
            torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("writes", ["older", "all"])
def test_memory_model_never_reads_at_or_after_a_query_position(writes):
    """Changing the item at position 15 of 20 (window 12 over positions 8..19) changes no state before it."""
    _, model = memory_model(memory_len=8, writes=writes)
    opened(model)
    seq = torch.randint(1, 41, (3, 20), generator=torch.Generator().manual_seed(8))
    later = seq.clone()
    later[:, 15:] = torch.randint(1, 41, (3, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model(H.Batch(seq)).hidden, model(H.Batch(later)).hidden
    torch.testing.assert_close(a[:, :15 - 8], b[:, :15 - 8], rtol=0, atol=1e-6)
    assert (a[:, 15 - 8:] - b[:, 15 - 8:]).abs().amax() > 1e-3


def test_memory_model_reads_older_items_and_trains_on_its_window():
    """memory_writes=all: with memory_len = 8 the model takes 12 + 8 items, encodes the last 12, and older items
    change the output only through the memory; the model aligns targets to the window and returns the weighted
    reconstruction loss over the window as its auxiliary loss."""
    cfg, model = memory_model(memory_len=8, writes="all")
    opened(model)
    assert model.input_len == 20
    seq = torch.randint(1, 41, (3, 21), generator=torch.Generator().manual_seed(4))
    inputs, targets = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        hidden = model(H.Batch(inputs)).hidden
        assert hidden.shape == (3, 12, 16)
        older = inputs.clone()
        older[:, :8] = torch.randint(1, 41, (3, 8), generator=torch.Generator().manual_seed(5))
        assert not torch.allclose(model(H.Batch(older)).hidden, hidden)  # the memory carries the older items
        reads = model.reads(H.Batch(older))
        assert reads["gate"].shape == reads["share"].shape == (3,) and (reads["share"] > 0).all()
        model.memory_out.weight.zero_()  # memory read switched off
        torch.testing.assert_close(model(H.Batch(older)).hidden, model(H.Batch(inputs)).hidden)
        assert (model.reads(H.Batch(older))["share"] == 0).all()
    out = model(H.Batch(inputs, targets))
    assert torch.equal(out.targets, targets[:, -12:])
    memory, key, value = model.memory.write_sequence(model.embed(inputs), inputs.gt(0).float())
    window = slice(-12, None)
    reconstruction = model.memory.reconstruction_loss(memory[:, window], key[:, window], value[:, window],
                                                      inputs[:, window].gt(0).float())
    torch.testing.assert_close(out.aux_loss, cfg["memory_loss"] * reconstruction, rtol=1e-6, atol=1e-7)
    loss = H.next_item_loss(out, model.output_table(), cfg)
    logits = (out.hidden @ model.output_table()[1:].T).flatten(0, 1)
    ce = F.cross_entropy(logits, (targets[:, -12:] - 1).flatten())
    torch.testing.assert_close(loss, ce + out.aux_loss, rtol=1e-5, atol=1e-6)
    assert 0 <= reconstruction.item() <= 2


def test_memory_stage_compares_each_extension_with_its_base(tmp_path):
    """Per seed: HoloMamba's window, window + memory and full window at each memory_len (the window shared), and
    SASRec against RAMRec; two slices each, state bytes, a streaming cost, read use, RAMRec's depth shares."""
    argv = ["--stage=memory", "--dataset=synthetic", "--max_len=8", "--memory_lens=8,16", "--long_history=20",
            "--models=HoloMamba,RAMRec", "--seeds=0,1", "--d_model=16", "--n_layers=1", "--epochs=1",
            f"--results_dir={tmp_path / 'r'}", f"--checkpoint_dir={tmp_path / 'c'}", f"--figures_dir={tmp_path / 'f'}"]
    assert H.main(argv) == 0
    import pandas as pd
    rows = pd.read_csv(tmp_path / "r" / "memory.csv")
    runs = rows[(rows["seed"] == 0) & (rows["slice"] == "all users")]
    short = "full window, reading the last 8"
    assert list(zip(runs["variant"], runs["memory_len"], runs["items_read"], runs["encoder_window"])) == [
        ("window", 0, 8, 8), ("window + memory", 8, 16, 8), ("full window", 8, 16, 16), (short, 8, 8, 16),
        ("window + memory", 16, 24, 8), ("full window", 16, 24, 24), (short, 16, 8, 24), ("SASRec", 0, 8, 8),
        ("RAMRec", 0, 8, 8)]
    assert len(rows) == 2 * 9 * 2 and sorted(rows["seed"].unique()) == [0, 1]
    # the long window reading its last 8 items: its own checkpoint ranked on the 8-item test inputs
    store = H.RunStore(H.resolve_config(H.parse_cli(argv + ["--resume"]), "synthetic"))
    cfg = store.cfg.replace(max_len=24)
    model = store.model(store.run(cfg, "HoloMamba", 0, reuse=True))
    data = store.dataset(cfg)
    split = data.eval_split("test", 8, H.excludes_seen(cfg, data), H.model_device(model))
    expected = H.full_ranking_metrics(H.rank_targets(model, split, cfg))["ndcg@10"]
    assert runs.set_index(["variant", "memory_len"]).loc[(short, 16), "ndcg@10"] == pytest.approx(expected, abs=1e-9)
    long_users = int((H.load_dataset("synthetic").train_lengths() > 20).sum())
    assert (rows.loc[rows["slice"] == "> 20 items", "users"] == long_users).all()
    state = runs.set_index(["variant", "memory_len"])["state_bytes"]
    # the memory adds S x d floats to the recurrent state, 8 slots x 16 x 4 bytes, and the ids of the window's 8
    # items, whose oldest enters the memory at the next item; RAMRec's bank per user: 32 states of 16 floats,
    # 32 int64 tags, 32 float usages and qualities, on top of SASRec's 8 item ids
    assert state[("window + memory", 8)] - state[("window", 0)] == 8 * 16 * 4 + 8 * 8
    assert state[("RAMRec", 0)] - state[("SASRec", 0)] == 32 * (16 * 4 + 8 + 4 + 4) and state[("SASRec", 0)] == 8 * 8
    assert (runs["step_ms"] > 0).all()
    used = runs.set_index("variant")
    assert used[["read_gate", "read_share"]].loc[["window", "full window", "SASRec"]].isna().all().all()
    assert (used.loc[["window + memory", "RAMRec"], "read_gate"].between(0, 1)).all()
    depth = pd.read_csv(tmp_path / "r" / "memory_depth.csv")
    data = H.load_dataset("synthetic")
    assert depth.groupby("seed")["users"].sum().tolist() == [data.n_users] * 2
    assert depth["depth"].between(0, 8).all()  # the default ramrec_k_max
    assert H.main(["--stage=memory", "--dataset=synthetic"]) == 2  # memory_len must be set


def test_warm_started_memory_model_starts_at_its_window_run(tiny):
    """HoloMamba with memory and warm_start=frozen: the window-alone run of the same seed is trained first; its
    validation is epoch 0; only the memory's parameters change."""
    cfg = H.config(**{**tiny, "max_len": 8, "epochs": 3}, memory_len=8, memory_slots=4, patience=3, warm_start="frozen")
    store = H.RunStore(cfg)
    run = store.run(cfg, "HoloMamba", 1)
    window = store.run(cfg.replace(memory_slots=0, memory_len=0), "HoloMamba", 1)
    assert window.history[0]["epoch"] == 1 and run.history[0]["epoch"] == 0
    assert run.history[0]["valid_ndcg@10"] == pytest.approx(window.metrics["valid"]["ndcg@10"], abs=1e-6)
    assert run.metrics["valid"]["ndcg@10"] >= window.metrics["valid"]["ndcg@10"] - 1e-6
    with_memory, alone = store.model(run).state_dict(), store.model(window).state_dict()
    assert all(torch.equal(with_memory[k], v) for k, v in alone.items())
    assert set(with_memory) - set(alone) and all(k.startswith(("memory", "read")) or "memory" in k
                                                 for k in set(with_memory) - set(alone))


def test_memory_stage_with_warm_starts_reuses_the_bases(tmp_path):
    """A frozen and then an all warm start: the second command trains only its extensions (the bases' checkpoints
    stay as the first wrote them) and both kinds of rows sit beside the bases in memory.csv and memory_depth.csv."""
    argv = ["--stage=memory", "--dataset=synthetic", "--max_len=8", "--memory_lens=8", "--models=HoloMamba,RAMRec",
            "--seeds=0", "--d_model=16", "--n_layers=1", "--epochs=2", f"--results_dir={tmp_path / 'r'}",
            f"--checkpoint_dir={tmp_path / 'c'}", f"--figures_dir={tmp_path / 'f'}"]
    assert H.main(argv + ["--warm_start=frozen"]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.pt")}
    assert H.main(argv + ["--warm_start=all"]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.pt")}
    assert len(again) == len(stamps) + 2 and all(again[name] == t for name, t in stamps.items())
    import pandas as pd
    rows = pd.read_csv(tmp_path / "r" / "memory.csv")
    assert sorted(rows.loc[rows["slice"] == "all users", "variant"]) == sorted([
        "window", "full window", "full window, reading the last 8", "SASRec", "window + memory, from base (frozen)",
        "RAMRec, from base (frozen)",
        "window + memory, from base (all)", "RAMRec, from base (all)"])
    depth = pd.read_csv(tmp_path / "r" / "memory_depth.csv")
    n = H.load_dataset("synthetic").n_users
    assert depth.groupby("variant")["users"].sum().to_dict() == {"RAMRec, from base (all)": n, "RAMRec, from base (frozen)": n}


def test_memory_stage_claims_the_bases_before_their_extensions(tmp_path, monkeypatch):
    """Processes sharing the stage claim runs in one order, bases first: one that reaches an extension while its
    base trains elsewhere skips it instead of training the base a second time."""
    claimed = []
    monkeypatch.setattr(H, "claim_trial", lambda log, key: claimed.append(key) and False)
    argv = ["--stage=memory", "--dataset=synthetic", "--max_len=8", "--memory_lens=8,16", "--models=HoloMamba,RAMRec",
            "--seeds=0", "--warm_start=frozen", f"--results_dir={tmp_path / 'r'}", f"--checkpoint_dir={tmp_path / 'c'}"]
    assert H.main(argv) == 0
    kinds = [next(m for m in ("RAMRec", "SASRec", "HoloMamba") if f"_{m}_" in key) for key in claimed]
    assert len(claimed) == 7 and kinds[-3:] == ["HoloMamba", "HoloMamba", "RAMRec"]  # the two memories, RAMRec
    assert kinds[:4] == ["HoloMamba", "HoloMamba", "HoloMamba", "SASRec"]  # window, two full windows, SASRec


def test_memory_stage_can_keep_the_full_windows_it_has(tmp_path):
    """--memory_full_window=false trains the window and its memory only; a full-window row already in memory.csv
    stays as it was."""
    import pandas as pd
    (tmp_path / "r").mkdir()
    kept = {"dataset": "synthetic", "slice": "all users", "model": "HoloMamba", "variant": "full window",
            "memory_len": 8, "seed": 0, "ndcg@10": 0.123}
    pd.DataFrame([kept]).to_csv(tmp_path / "r" / "memory.csv", index=False)
    argv = ["--stage=memory", "--dataset=synthetic", "--max_len=8", "--memory_lens=8", "--models=HoloMamba",
            "--seeds=0", "--d_model=16", "--n_layers=1", "--epochs=1", "--memory_full_window=false",
            f"--results_dir={tmp_path / 'r'}", f"--checkpoint_dir={tmp_path / 'c'}", f"--figures_dir={tmp_path / 'f'}"]
    assert H.main(argv) == 0
    rows = pd.read_csv(tmp_path / "r" / "memory.csv")
    assert sorted(rows.loc[rows["slice"] == "all users", "variant"]) == ["full window", "window", "window + memory"]
    assert rows.loc[rows["variant"] == "full window", "ndcg@10"].tolist() == [0.123]
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2
