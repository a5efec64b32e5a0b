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


def memory_model(memory_len=0, max_len=12, seed=0):
    cfg = H.resolve_config({"d_model": 16, "n_layers": 2, "max_len": max_len, "dropout": 0.0, "memory_slots": 4,
                            "memory_len": memory_len, "scan_backend": "parallel"}, "synthetic")
    torch.manual_seed(seed)
    return cfg, H.build_model("HoloMamba", H.catalog_only(40), cfg).eval()


def test_streaming_steps_with_memory_equal_the_full_forward():
    cfg, model = memory_model()
    seq = torch.randint(1, 41, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        state, table = model.init_state(1), model.output_table()[1:]
        for t in range(seq.shape[1]):
            scores, state = model.step(state, seq[:, t], table)
            torch.testing.assert_close(scores, model.score_next(H.Batch(seq[:, :t + 1])), rtol=1e-4, atol=1e-4)


def test_memory_model_reads_older_items_and_trains_on_its_window():
    """With memory_len = 8 the model takes 12 + 8 items, encodes the last 12, and older items change the
    output only through the memory; the model aligns targets to the window and returns the weighted
    reconstruction loss as its auxiliary loss."""
    cfg, model = memory_model(memory_len=8)
    assert model.input_len == 20
    seq = torch.randint(1, 41, (3, 21), generator=torch.Generator().manual_seed(4))
    inputs, targets = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        hidden = model(H.Batch(inputs)).hidden
        assert hidden.shape == (3, 12, 16)
        older = inputs.clone()
        older[:, :8] = torch.randint(1, 41, (3, 8), generator=torch.Generator().manual_seed(5))
        assert not torch.allclose(model(H.Batch(older)).hidden, hidden)  # the memory carries the older items
        model.memory_gate.weight.zero_()
        model.memory_gate.bias.fill_(-60.0)  # memory read switched off
        torch.testing.assert_close(model(H.Batch(older)).hidden, model(H.Batch(inputs)).hidden)
    out = model(H.Batch(inputs, targets))
    assert torch.equal(out.targets, targets[:, -12:])
    reconstruction = model.memory.reconstruction_loss(*model.memory.write_sequence(model.embed(inputs), inputs.gt(0).float()),
                                                      inputs.gt(0).float())
    torch.testing.assert_close(out.aux_loss, cfg["memory_loss"] * reconstruction, rtol=1e-6, atol=1e-7)
    loss = H.next_item_loss(out, model.output_table(), cfg)
    logits = (out.hidden @ model.output_table()[1:].T).flatten(0, 1)
    ce = F.cross_entropy(logits, (targets[:, -12:] - 1).flatten())
    torch.testing.assert_close(loss, ce + out.aux_loss, rtol=1e-5, atol=1e-6)
    assert 0 <= reconstruction.item() <= 2


def test_memory_stage_compares_three_variants(tmp_path):
    argv = ["--stage=memory", "--dataset=synthetic", "--max_len=8", "--memory_len=16", "--long_history=20",
            "--d_model=16", "--n_layers=1", "--epochs=1", f"--results_dir={tmp_path / 'r'}",
            f"--checkpoint_dir={tmp_path / 'c'}", f"--figures_dir={tmp_path / 'f'}"]
    assert H.main(argv) == 0
    import pandas as pd
    rows = pd.read_csv(tmp_path / "r" / "memory.csv")
    assert rows["variant"].tolist() == ["window", "window", "window + memory", "window + memory",
                                        "full window", "full window"]
    assert rows["items_read"].tolist() == [8, 8, 24, 24, 24, 24]
    long_users = int((H.load_dataset("synthetic").train_lengths() > 20).sum())
    assert rows[rows["slice"] == "> 20 items"]["users"].tolist() == [long_users] * 3
    # the memory adds S x d floats to the recurrent state: 8 slots x 16 x 4 bytes
    state = rows.drop_duplicates("variant").set_index("variant")["recurrent_state_bytes"]
    assert state["window + memory"] - state["window"] == 8 * 16 * 4
    assert H.main(["--stage=memory", "--dataset=synthetic"]) == 2  # memory_len must be set
