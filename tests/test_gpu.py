"""Scan backends on the GPU: mamba-ssm's fused kernel against the reference and parallel scans.
Skipped without CUDA and mamba-ssm (CI has neither; run on a GPU machine)."""
import pytest
import torch

import HoloMambaRec as H

needs_kernel = pytest.mark.skipif(not torch.cuda.is_available() or H.cuda_kernel("selective_scan") is None,
                                  reason="needs CUDA and mamba-ssm")
needs_ssd = pytest.mark.skipif(not torch.cuda.is_available() or H.cuda_kernel("ssd") is None,
                               reason="needs CUDA, mamba-ssm and Triton")


def scan_inputs(b=2, l=64, d=32, n=16, device="cuda"):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, l, d, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, l, d, generator=g) - 2)
    A = -torch.rand(d, n, generator=g) * 4 - 0.1
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D = torch.randn(d, generator=g)
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D)]


@needs_kernel
@pytest.mark.parametrize("backend", ["cuda", "parallel"])
def test_backend_matches_reference_forward_and_gradients(backend):
    inputs = scan_inputs()
    y_ref, h_ref = H.selective_scan_reference(*inputs)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), inputs)
    y, h = H.SCAN_BACKENDS[backend](*inputs)
    grads = torch.autograd.grad(y.square().sum(), inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.float(), h_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


@needs_kernel
def test_holomamba_same_scores_with_cuda_and_parallel_backends():
    cfg = H.config("synthetic", d_model=32, n_layers=2, max_len=30, scan_backend="cuda")
    torch.manual_seed(0)
    model = H.build_model("HoloMamba", H.catalog_only(100), cfg, "cuda").eval()
    assert model.scan_backend == "cuda"
    seq = torch.randint(0, 101, (4, 30), device="cuda")
    seq[:, -1] = 5
    with torch.no_grad():
        fused = model.score_next(H.Batch(seq))
        model.set_scan_backend("parallel")
        plain = model.score_next(H.Batch(seq))
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def assert_kernel_block_matches_parallel(block):
    """block (width 32, on CUDA) through its kernel path against the same block on the parallel scan, on
    left-padded input, in fp32: outputs at real steps to 1e-4, gradients of the input and every weight to 1e-3."""
    x = torch.randn(3, 40, 32, device="cuda", requires_grad=True)
    mask = torch.ones(3, 40, 1, device="cuda")
    mask[0, :25], mask[1, :3] = 0, 0
    outs, grads = [], []
    for backend in ("cuda", "parallel"):
        block.use_backend(backend)
        y = block(x, mask)
        outs.append(y)
        grads.append(torch.autograd.grad((y * mask).square().sum(), [x, *block.parameters()]))
    torch.testing.assert_close(outs[0] * mask, outs[1] * mask, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


@needs_kernel
def test_kernel_layout_block_matches_the_parallel_block_in_values_and_gradients():
    """MambaBlock.forward_kernels (the (b, d, l) layout, fused Δ softplus and gate) against the plain forward."""
    torch.manual_seed(0)
    assert_kernel_block_matches_parallel(H.MambaBlock(32, 16).cuda())


@needs_ssd
def test_mamba2_chunked_kernel_matches_the_parallel_block_in_values_and_gradients():
    """Mamba2Block through mamba-ssm's chunked scan (chunks of 16 steps, so a 40-step row spans three) against the
    same block on the parallel scan."""
    torch.manual_seed(0)
    block = H.Mamba2Block(32, 16, headdim=16, chunk=16).cuda()
    with torch.no_grad():
        block.D.normal_()  # away from its initial ones, so a mix-up of heads shows
    assert_kernel_block_matches_parallel(block)


def assert_fused_loss_matches_torch(kernel, smoothing, width, items, seed, table_scale=1.0):
    """next_item_loss through `kernel` against F.cross_entropy, both under bf16 autocast, ignored rows included:
    loss to 1e-3 relative, gradients to 2% of their largest entry (bf16 keeps 8 bits of mantissa; both paths
    round their matrix products to it)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 30, width, generator=g).cuda().requires_grad_()
    table = (torch.randn(items, width, generator=g) * table_scale).cuda().requires_grad_()
    targets = torch.randint(0, items, (4, 30), generator=g).cuda()
    targets[:, :5] = 0
    cfg = H.config("synthetic", label_smoothing=smoothing)
    losses, grads = [], []
    for name in (kernel, "torch"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = H.next_item_loss(H.Output(hidden, targets), table, cfg.replace(ce_kernel=name))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [hidden, table]))
    torch.testing.assert_close(losses[0].float(), losses[1].float(), rtol=1e-3, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available() or H.cce_kernel() is None, reason="needs CUDA and cut-cross-entropy")
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_cross_entropy_equals_the_torch_loss(smoothing):
    """cut-cross-entropy (the kernel's backward takes bf16)."""
    assert_fused_loss_matches_torch("cce", smoothing, 16, 1001, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available() or H.triton_lse() is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("smoothing,width,items", [(0.0, 16, 1001), (0.1, 64, 3000), (0.1, 96, 517)])
def test_triton_cross_entropy_equals_the_torch_loss(smoothing, width, items):
    """The script's fused log-sum-exp kernels (ce_kernel=triton): widths that fill a tile and one padded to it
    (96 -> 128), catalogs that end mid-tile, the items split over several programs."""
    assert_fused_loss_matches_torch("triton", smoothing, width, items, seed=2, table_scale=width ** -0.5)


@pytest.mark.skipif(not torch.cuda.is_available() or H.triton_lse() is None, reason="needs CUDA and Triton")
def test_fused_log_sum_exp_equals_torch_on_many_rows():
    """FusedLogSumExp in bf16 against torch.logsumexp of the same bf16 values in fp32, with rows split over
    several programs for d/dw: lse to 1e-3, gradients to 2% of their largest entry."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5000, 64, generator=g).cuda().bfloat16().requires_grad_()
    table = (torch.randn(300, 64, generator=g) / 8).cuda().bfloat16().requires_grad_()
    weight = torch.rand(5000, generator=g).cuda()
    lse = H.FusedLogSumExp.apply(hidden, table)
    reference = torch.logsumexp(hidden.float() @ table.float().T, 1)
    torch.testing.assert_close(lse, reference, rtol=0, atol=1e-3)
    ours = torch.autograd.grad((lse * weight).sum(), [hidden, table])
    theirs = torch.autograd.grad((reference * weight).sum(), [hidden, table])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_compiled_chunked_cross_entropy_equals_the_torch_loss_under_autocast(smoothing):
    """The chunked loss on CUDA (products in bf16, each chunk's element-wise work compiled; 1,000 items in chunks
    of 300, so the last chunk has its own shape) against F.cross_entropy under the same autocast: loss to 1e-3
    relative, gradients to 2% of their largest entry."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 30, 16, generator=g).cuda().requires_grad_()
    table = torch.randn(1001, 16, generator=g).cuda().requires_grad_()
    targets = torch.randint(0, 1001, (4, 30), generator=g).cuda()
    targets[:, :5] = 0
    cfg = H.config("synthetic", label_smoothing=smoothing, ce_kernel="torch")
    losses, grads = [], []
    for chunk in (300, 0):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = H.next_item_loss(H.Output(hidden, targets), table, cfg.replace(ce_chunk=chunk))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [hidden, table]))
    torch.testing.assert_close(losses[0].float(), losses[1].float(), rtol=1e-3, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


def step_losses(name, graphs, resume_after=0, compiled=False, keep=None, **extra):
    """Training losses over 6 fixed batches (dropout off) with a graphed or an eager step (of the model, or of
    torch.compile of it). With resume_after=n, an eager step trains the first n batches and hands its optimizer
    state to the step under test. A list given as keep receives the step under test."""
    cfg = H.config("synthetic", d_model=32, n_layers=2, max_len=20, dropout=0.0, batch_size=8, **{"amp": False, **extra})
    g = torch.Generator().manual_seed(0)
    batches = [H.fake_batch(50, 8, 20, "cuda", g) for _ in range(6)]
    torch.manual_seed(0)
    model = H.build_model(name, H.catalog_only(50), cfg.replace(cuda_graphs=graphs), "cuda").train()
    state = None
    if resume_after:
        first = H.make_train_step(model, model, cfg.replace(cuda_graphs=False), None, 6)
        for batch in batches[:resume_after]:
            first(batch)
        state = first.optimizer.state_dict()
    step = H.make_train_step(model, torch.compile(model) if compiled else model, cfg.replace(cuda_graphs=graphs), None, 6)
    assert isinstance(step, H.GraphedStep) == graphs
    if state is not None:
        step.load_optimizer_state(state)
    if keep is not None:
        keep.append(step)
    return torch.stack([step(batch) for batch in batches[resume_after:]]).cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["HoloMamba", "SASRec", "GRU4Rec"])
def test_cuda_graph_training_matches_eager(name):
    """The captured-and-replayed training step follows the eager step."""
    torch.testing.assert_close(step_losses(name, True), step_losses(name, False), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or H.triton_lse() is None, reason="needs CUDA and Triton")
def test_cuda_graph_training_with_the_triton_loss_matches_eager():
    """The fused log-sum-exp kernels inside a captured step (compiled before capture, launched in replay)."""
    torch.testing.assert_close(step_losses("HoloMamba", True, amp=True, ce_kernel="triton"),
                               step_losses("HoloMamba", False, amp=True, ce_kernel="triton"), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_training_keeps_the_same_weight_average():
    """The average moves after every replay as after every eager step (and the capture's warm-up leaves it)."""
    averages = []
    for graphs in (True, False):
        steps = []
        step_losses("HoloMamba", graphs, keep=steps, weight_average=0.5)
        with steps[0].evaluated_weights():
            averages.append([p.detach().clone() for p in steps[0].model.parameters()])
        assert steps[0].average.updates == 6
    for graphed, eager in zip(*averages):
        torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-4)


@needs_ssd
def test_cuda_graph_training_with_the_mamba2_kernel_matches_eager():
    """The chunked scan's Triton kernels tune on the warm-up steps before capture and then replay in the graph."""
    torch.testing.assert_close(step_losses("HoloMamba", True, mixer="mamba2"),
                               step_losses("HoloMamba", False, mixer="mamba2"), rtol=1e-3, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("name", ["HoloMamba", "SASRec"])
def test_compiled_graphed_training_matches_eager(name):
    """torch.compile of the model inside the captured step follows the plain eager step (fp32)."""
    torch.testing.assert_close(step_losses(name, True, compiled=True), step_losses(name, False), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replayed_training_is_seen_by_evaluation():
    """Replays update the weights in place without touching tensor versions: evaluation after each epoch must
    still see the new weights (a version-keyed cache once froze validation at epoch 1)."""
    data = H.load_dataset("synthetic")
    torch.manual_seed(0)
    model = H.build_model("HoloMamba", data, d_model=32, n_layers=1, max_len=20, epochs=4, patience=10,
                          device="cuda")
    result = H.fit(model, data)
    scores = [h["valid_ndcg@10"] for h in result.history]
    assert len(set(scores)) == len(scores)  # every epoch's evaluation differs
    model.load_state_dict(result.best_state)
    final = H.evaluate(model, data, "valid")
    assert final["ndcg@10"] == pytest.approx(max(scores), abs=1e-6)  # the best weights are the best epoch's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_checkpoint_trained_on_cuda_loads_and_ranks_alike_on_the_cpu(tmp_path):
    data = H.load_dataset("synthetic")
    torch.manual_seed(0)
    model = H.build_model("HoloMamba", data, d_model=32, n_layers=1, max_len=20, epochs=2, device="cuda")
    H.fit(model, data)
    H.save(model, tmp_path / "m.pt")
    on_cpu = H.load(tmp_path / "m.pt", device="cpu")
    assert on_cpu.scan_backend == "reference" and H.load(tmp_path / "m.pt", device="cuda").scan_backend == model.scan_backend
    gpu = H.evaluate(model, data, "test", model.config)
    cpu = H.evaluate(on_cpu, data, "test", model.config)
    assert cpu["ndcg@10"] == pytest.approx(gpu["ndcg@10"], abs=2e-3)  # bf16 scores on the GPU, fp32 on the CPU
    assert on_cpu.recommend(user=data.raw_users[0], k=5)[0][0] in {i for i, _ in model.recommend(user=data.raw_users[0], k=10)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_training_resumes_with_its_optimizer_state():
    """A graphed step given a resumed optimizer state keeps it through capture (a fresh one starts at zero)."""
    torch.testing.assert_close(step_losses("HoloMamba", True, resume_after=3),
                               step_losses("HoloMamba", False, resume_after=3), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, compiled", [("HoloMamba", False), ("GRU4Rec", False), ("HoloMamba", True)])
def test_graphed_stream_equals_the_eager_steps(name, compiled):
    """GraphedStream folds items into its static state exactly as model.step does (fp32, to 1e-5; with compile,
    the graph replays torch.compile's kernels of the step, to 1e-4: fused kernels may sum in another order)."""
    cfg = H.config("synthetic", d_model=32, n_layers=2, max_len=20, amp=False, compile=compiled)
    torch.manual_seed(0)
    model = H.build_model(name, H.catalog_only(60), cfg, "cuda").eval()
    items = torch.randint(1, 61, (3, 7), device="cuda")
    stream = H.GraphedStream(model, 3)
    state, table = model.init_state(3), model.output_table()[1:]
    with torch.no_grad():
        for t in range(items.shape[1]):
            expected, state = model.step(state, items[:, t], table)
            tol = 1e-4 if compiled else 1e-5
            torch.testing.assert_close(stream(items[:, t]).clone(), expected, rtol=tol, atol=tol)
    assert hasattr(model.stepper, "_torchdynamo_orig_callable") == compiled  # the graph replayed the compiled step
