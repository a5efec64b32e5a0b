"""The chunked full-softmax cross-entropy against F.cross_entropy: value and both gradients, with label smoothing
and ignored rows, in float64; and next_item_loss takes it only for catalogs larger than ce_chunk."""
import pytest
import torch
import torch.nn.functional as F

import HoloMambaRec as H


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_cross_entropy_equals_the_plain_one(chunk, smoothing):
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(30, 16, dtype=torch.float64, generator=g, requires_grad=True)
    table = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (30,), generator=g)
    targets[[2, 5, 11]] = -1  # padding positions
    loss = H.ChunkedCrossEntropy.apply(hidden, table, targets, smoothing, chunk)
    grads = torch.autograd.grad(3 * loss, [hidden, table])
    plain = F.cross_entropy(hidden @ table.T, targets, ignore_index=-1, label_smoothing=smoothing)
    expected = torch.autograd.grad(3 * plain, [hidden, table])
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_all_rows_ignored_gives_zero_not_nan():
    hidden, table = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = H.ChunkedCrossEntropy.apply(hidden, table, torch.full((4,), -1), 0.1, 3)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and table.grad.abs().sum() == 0


def test_next_item_loss_chunks_only_large_catalogs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    table = torch.randn(41, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 41, (3, 5), generator=g)  # 0: padding
    out = H.Output(hidden, targets)
    cfg = H.config("synthetic", label_smoothing=0.1)
    plain = H.next_item_loss(out, table, cfg.replace(ce_chunk=0))
    chunked = H.next_item_loss(out, table, cfg.replace(ce_chunk=16))  # 40 items > 16: three chunks
    torch.testing.assert_close(chunked.float(), plain, rtol=1e-6, atol=1e-6)  # the plain path computes fp32 logits


def test_loss_path_on_the_cpu():
    """auto on the CPU: F.cross_entropy, chunked above ce_chunk; the fused kernels ask for a CUDA device."""
    cfg = H.config("synthetic", ce_chunk=1000)
    cpu = torch.device("cpu")
    assert H.loss_path(cfg, 1000, cpu) == "torch" and H.loss_path(cfg, 1001, cpu) == "chunked"
    assert H.loss_path(cfg.replace(num_negatives=8), 1001, cpu) == "sampled"
    for kernel in ("triton", "cce"):
        with pytest.raises(H.ConfigError, match=f"--ce_kernel={kernel} needs a CUDA device"):
            H.loss_path(cfg.replace(ce_kernel=kernel), 1000, cpu)
