"""Models: one contract (Batch -> Output) for all, shapes, inert left padding, streaming steps against the full
forward, scan backends chosen once, bundling."""
import pytest
import torch

import HoloMambaRec as H

N_ITEMS = 37
MAX_LEN = 12


def tiny_cfg(**extra):
    """scan_backend is pinned to "parallel" so that these tests check their own property; the default
    "auto" is covered by test_build_model_with_default_auto_scan_backend_runs."""
    return H.resolve_config({"d_model": 16, "n_layers": 2, "d_state": 8, "max_len": MAX_LEN, "dropout": 0.1,
                             "n_heads": 2, "device": "cpu", "scan_backend": "parallel", **extra}, "synthetic")


def perturbed(model, seed=0, scale=0.1):
    """Move every weight away from its initial value (LayerNorm biases, alpha, ...), as training would,
    keeping the padding rows of embeddings at zero (their gradient is zero, so training keeps them zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
    return model.eval()


def build(name, seed=0, data=None, **extra):
    torch.manual_seed(seed)
    return perturbed(H.build_model(name, data or H.catalog_only(N_ITEMS), tiny_cfg(**extra)), seed)


def hidden(model, seq):
    return model(H.Batch(seq)).hidden


def score(model, seq):
    return model.score_next(H.Batch(seq))


def random_items(shape, seed=0, n_items=N_ITEMS):
    return torch.randint(1, n_items + 1, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", H.MODEL_NAMES)
def test_shapes_with_catalog_only(name):
    model = build(name)
    seq = random_items((3, MAX_LEN))
    seq[0, :4] = 0  # some left padding
    targets = random_items((3, MAX_LEN), seed=1)
    with torch.no_grad():
        out = model(H.Batch(seq, targets))
        assert out.hidden.shape == (3, MAX_LEN, 16)
        # the model says which item each state predicts: the next item, 0 where the input is padding
        assert torch.equal(out.targets, torch.where(seq > 0, targets, 0))
        assert hidden(model, seq[:, -5:]).shape == (3, 5, 16)
        assert model(H.Batch(seq)).targets is None  # no targets outside training
        scores = score(model, seq)
    assert scores.shape == (3, N_ITEMS)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert model.output_table().shape == (N_ITEMS + 1, 16)
    assert model.name == name and model.input_len == MAX_LEN


@pytest.mark.parametrize("name", H.MODEL_NAMES)
def test_shapes_with_loaded_dataset(name):
    cfg = tiny_cfg()
    data = H.load_dataset(cfg)
    torch.manual_seed(0)
    model = H.build_model(name, data, cfg).eval()
    inputs, targets = data.eval_split("valid", MAX_LEN)[:2]
    with torch.no_grad():
        states = hidden(model, inputs[:5])
        scores = score(model, inputs[:5])
    assert states.shape == (5, MAX_LEN, 16)
    assert scores.shape == (5, data.n_items)
    assert inputs.shape == (data.n_users, MAX_LEN) and targets.shape == (data.n_users,)


@pytest.mark.parametrize("name", ["HoloMamba", "Mamba-ItemOnly"])
def test_build_model_with_default_auto_scan_backend_runs(name):
    """build_model on a validated config with the default scan_backend="auto" gives a model that runs on the CPU
    (auto means the loop over time there, the fastest CPU scan), with the parallel scan's scores to 1e-5."""
    cfg = H.resolve_config({"d_model": 16, "n_layers": 1, "d_state": 8, "max_len": MAX_LEN}, "synthetic")
    assert cfg["scan_backend"] == "auto"
    seq = random_items((2, MAX_LEN), seed=3)
    torch.manual_seed(0)
    auto = H.build_model(name, H.catalog_only(N_ITEMS), cfg, "cpu").eval()
    torch.manual_seed(0)
    parallel = H.build_model(name, H.catalog_only(N_ITEMS), cfg.replace(scan_backend="parallel"), "cpu").eval()
    assert auto.scan_backend == "reference" and parallel.scan_backend == "parallel"  # chosen once, at build
    assert all(m.scan is H.selective_scan_reference for m in auto.mixers)
    with torch.no_grad():
        torch.testing.assert_close(score(auto, seq), score(parallel, seq), rtol=1e-5, atol=1e-5)


def test_holomamba_binding_changes_item_vectors_and_itemonly_does_not():
    data = H.catalog_only(N_ITEMS)
    torch.manual_seed(0)
    holo = H.build_model("HoloMamba", data, tiny_cfg())
    torch.manual_seed(0)
    plain = H.build_model("Mamba-ItemOnly", data, tiny_cfg())
    ids = torch.arange(1, N_ITEMS + 1)
    with torch.no_grad():
        torch.testing.assert_close(plain.item_vectors(ids), plain.item_emb(ids), rtol=0, atol=0)
        e = holo.item_emb(ids)
        a = holo.attr_emb(data.item_attributes[ids]).squeeze(1)
        torch.testing.assert_close(holo.item_vectors(ids), e + holo.alpha * H.bind(e, a), rtol=1e-6, atol=1e-6)
        assert holo.item_vectors(torch.tensor([0])).abs().max().item() == 0.0  # padding vector is zero


@pytest.mark.parametrize("name", H.MODEL_NAMES)
def test_left_padding_is_inert(name):
    model = build(name, seed=1)
    core = random_items((3, 6), seed=2)
    padded_3 = torch.cat([torch.zeros(3, 3, dtype=torch.long), core], 1)  # length 9
    padded_6 = torch.cat([torch.zeros(3, 6, dtype=torch.long), core], 1)  # length 12 = max_len
    with torch.no_grad():
        base = hidden(model, core)[:, -1]
        for padded in (padded_3, padded_6):
            torch.testing.assert_close(hidden(model, padded)[:, -1], base, rtol=0, atol=1e-5)
        # a batch of different lengths, padded to the same width, equals each sequence alone
        mixed = padded_6.clone()
        mixed[1, :8] = 0  # row 1 keeps only its last 4 items
        out = hidden(model, mixed)[:, -1]
        torch.testing.assert_close(out[1], hidden(model, core[1:2, -4:])[0, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[[0, 2]], base[[0, 2]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["HoloMamba", "GRU4Rec"])
def test_streaming_step_matches_full_forward(name):
    model = build(name, seed=3)
    seq = random_items((1, 10), seed=4)
    with torch.no_grad():
        state = model.init_state(1)
        for t in range(seq.shape[1]):
            scores, state = model.step(state, seq[:, t])
            assert scores.shape == (1, N_ITEMS)
            torch.testing.assert_close(scores, score(model, seq[:, :t + 1]), rtol=1e-4, atol=1e-4)


def streamed_scores(model, seq, step):
    """The scores after stepping every column of seq through step(state, items) from a fresh state."""
    with torch.no_grad():
        state = model.init_state(len(seq))
        for t in range(seq.shape[1]):
            scores, state = step(state, seq[:, t])
    return scores


def test_compiled_streaming_step_on_the_cpu_matches_the_full_forward():
    """With compile set, stream_step runs torch.compile(step) on the CPU: the same scores as the full forward."""
    model = build("HoloMamba", seed=3, compile=True)
    seq = random_items((1, 6), seed=4)
    scores = streamed_scores(model, seq, model.stream_step)
    with torch.no_grad():
        torch.testing.assert_close(scores, score(model, seq), rtol=1e-4, atol=1e-4)
    assert model.stepper is not model.step and hasattr(model.stepper, "_torchdynamo_orig_callable")


def test_mamba_ffn_off_streaming_matches_full_forward():
    model = build("HoloMamba", seed=5, ffn=False, n_layers=3)
    assert len(model.ffns) == 0
    seq = random_items((2, 7), seed=6)
    scores = streamed_scores(model, seq, model.step)
    with torch.no_grad():
        torch.testing.assert_close(scores, score(model, seq), rtol=1e-4, atol=1e-4)


def test_mamba_block_reference_and_parallel_backends_agree():
    torch.manual_seed(0)
    block = H.MambaBlock(16, d_state=8, d_conv=4, expand=2, scan_backend="reference")
    hidden = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(3, 11, 1)
    mask[0, :4] = 0
    out_ref = block(hidden, mask)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), [hidden, *block.parameters()])
    block.use_backend("parallel")
    out_par = block(hidden, mask)
    grads_par = torch.autograd.grad(out_par.square().sum(), [hidden, *block.parameters()])
    torch.testing.assert_close(out_par, out_ref, rtol=1e-5, atol=1e-5)
    for g, gr in zip(grads_par, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-4)


def test_holomamba_scores_same_with_reference_and_parallel_backends():
    model = build("HoloMamba", seed=7, scan_backend="reference")
    seq = random_items((4, MAX_LEN), seed=8)
    seq[1, :5] = 0
    with torch.no_grad():
        ref = score(model, seq)
        model.set_scan_backend("parallel")
        par = score(model, seq)
    torch.testing.assert_close(par, ref, rtol=1e-5, atol=1e-5)


def test_mamba_block_step_matches_forward():
    torch.manual_seed(0)
    block = H.MambaBlock(16, d_state=8, d_conv=3, expand=2).eval()
    hidden = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = block(hidden)
        state = block.init_state(2, torch.device("cpu"))
        for t in range(9):
            out, state = block.step(hidden[:, t], state)
            torch.testing.assert_close(out, full[:, t], rtol=1e-5, atol=1e-5)


def ssd_per_head(block, hidden):
    """Mamba-2's recurrence written per head, independently of the block's reuse of the Mamba-1 scan:
    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ (headdim x d_state per head), y_t = h_t C_t + D_h x_t."""
    xbc, z, dt = block.in_proj(hidden).split([block.conv.in_channels, block.out_proj.in_features, block.heads], -1)
    xbc = torch.nn.functional.silu(block.conv(xbc.transpose(1, 2))[..., : hidden.shape[1]].transpose(1, 2))
    x, B, C = xbc.split([z.shape[-1], block.d_state, block.d_state], -1)
    x = x.unflatten(-1, (block.heads, block.headdim))  # (b, l, h, p)
    dt = torch.nn.functional.softplus(dt + block.dt_bias)  # (b, l, h)
    A = -torch.exp(block.A_log)
    h = hidden.new_zeros(hidden.shape[0], block.heads, block.headdim, block.d_state)
    ys = []
    for t in range(hidden.shape[1]):
        h = (torch.exp(dt[:, t] * A)[..., None, None] * h
             + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, None, None, :])
        ys.append((h * C[:, t, None, None, :]).sum(-1) + block.D[:, None] * x[:, t])
    y = torch.stack(ys, 1).flatten(-2)
    return block.out_proj(y * torch.nn.functional.silu(z))


def test_mamba2_block_is_the_per_head_recurrence_on_every_backend_and_in_streaming():
    """Mamba2Block against Mamba-2's recurrence written per head (to 1e-5), with the reference and parallel scans
    equal in values and gradients (to 1e-4), left padding inert, and the streaming step equal to the forward."""
    torch.manual_seed(0)
    block = H.Mamba2Block(16, d_state=8, d_conv=4, expand=2, headdim=8, scan_backend="reference")
    assert block.heads == 4 and block.A_log.shape == block.D.shape == block.dt_bias.shape == (4,)
    assert -torch.exp(block.A_log).max() <= -1 and -torch.exp(block.A_log).min() >= -16  # A uniform in [-16, -1]
    hidden = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(block(hidden), ssd_per_head(block, hidden), rtol=1e-5, atol=1e-5)
    mask = torch.ones(3, 11, 1)
    mask[0, :4] = 0
    outs, grads = [], []
    for backend in ("reference", "parallel"):
        block.use_backend(backend)
        outs.append(block(hidden, mask))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), [hidden, *block.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(outs[0][:1, 4:], block(hidden[:1, 4:]), rtol=1e-5, atol=1e-5)
        state = block.init_state(3, torch.device("cpu"))
        for t in range(11):
            out, state = block.step(hidden[:, t], state)
            torch.testing.assert_close(out, block(hidden)[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["HoloMamba", "Mamba-ItemOnly"])
def test_mamba2_models_stream_and_pad_like_their_forward(name):
    model = build(name, seed=11, mixer="mamba2", headdim=8)
    assert all(isinstance(m, H.Mamba2Block) for m in model.mixers) and len(model.mixers) == 2
    seq = random_items((2, 7), seed=12)
    with torch.no_grad():
        torch.testing.assert_close(streamed_scores(model, seq, model.step), score(model, seq), rtol=1e-4, atol=1e-4)
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), seq], dim=1)
        torch.testing.assert_close(score(model, padded), score(model, seq), rtol=1e-5, atol=1e-5)
    with pytest.raises(H.ConfigError, match="--headdim=12: must divide expand \\* d_model"):
        tiny_cfg(mixer="mamba2", headdim=12)


def test_bundled_forward_with_window_one_is_the_plain_forward():
    model = build("HoloMamba", seed=9)
    seq = random_items((3, 8), seed=10)
    seq[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.bundled(H.Batch(seq), 1).hidden, hidden(model, seq), rtol=1e-6, atol=1e-6)
        with model.bundling(4):  # k = 4 reads ceil(l / k) tokens
            assert hidden(model, seq).shape == (3, 2, 16)
            assert hidden(model, seq[:, 1:]).shape == (3, 2, 16)
        assert model.bundle_k == 1 and hidden(model, seq).shape == (3, 8, 16)  # the context restores it


def test_sasrec_attention_never_sees_later_items():
    model = build("SASRec", seed=11)
    seq = random_items((2, 8), seed=12)
    changed = seq.clone()
    changed[:, 5:] = random_items((2, 3), seed=13)
    with torch.no_grad():
        torch.testing.assert_close(hidden(model, changed)[:, :5], hidden(model, seq)[:, :5], rtol=0, atol=1e-5)


def test_bundled_training_loss_has_one_target_per_window():
    """With bundle_k = k the encoder emits one state per window of k items (end-aligned) and the loss asks
    each state for the item that follows its window's last item."""
    cfg = H.resolve_config({"d_model": 16, "n_layers": 1, "max_len": 7, "dropout": 0.0, "bundle_k": 2,
                            "scan_backend": "parallel"}, "synthetic")
    torch.manual_seed(0)
    model = H.build_model("HoloMamba", H.catalog_only(30), cfg).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7]])
    inputs, targets = seq[:, :-1], seq[:, 1:]  # length 7 -> padded to 8 -> 4 windows
    out = model(H.Batch(inputs, targets))
    assert out.hidden.shape == (2, 4, 16)
    # windows (padded left by 1): [pad, x0], [x1, x2], [x3, x4], [x5, x6] -> targets at positions 0, 2, 4, 6
    labels = targets[:, [0, 2, 4, 6]]
    valid = inputs[:, [0, 2, 4, 6]] > 0
    assert torch.equal(out.targets, torch.where(valid, labels, 0))
    logits = out.hidden @ model.output_table()[1:].T
    expected = torch.nn.functional.cross_entropy(logits[valid], labels[valid] - 1)
    torch.testing.assert_close(H.next_item_loss(out, model.output_table(), cfg), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bundle_k"):
        model.step(model.init_state(1), torch.tensor([3]))


def test_models_take_no_unknown_constructor_arguments():
    """Every model is built as Model(cfg, catalog): a mistyped keyword is an error, never swallowed."""
    cfg, catalog = tiny_cfg(), H.catalog_only(N_ITEMS)
    for name, cls in H.MODELS.items():
        with pytest.raises(TypeError):
            cls(cfg, catalog, n_user=3)
    with pytest.raises(H.ConfigError, match="unknown model 'BERT4Rec'"):
        H.build_model("BERT4Rec", catalog, cfg)
    with pytest.raises(H.ConfigError, match="unknown config key 'dmodel'"):
        H.build_model("SASRec", catalog, cfg, dmodel=8)


def test_capabilities_live_on_the_models():
    caps = {name: (cls.reads_users, cls.graph_safe, cls.recurrent) for name, cls in H.MODELS.items()}
    assert caps == {"HoloMamba": (False, True, True), "Mamba-ItemOnly": (False, True, True),
                    "SASRec": (False, True, False), "GRU4Rec": (False, True, True), "RAMRec": (True, False, False),
                    "HoloMamba-Shuffled": (False, True, True)}
    with pytest.raises(NotImplementedError, match="SASRec has no recurrent state"):
        build("SASRec").init_state(1)
