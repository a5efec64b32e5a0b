"""Selective scans: the PyTorch parallel scan against the Python reference loop (outputs, final state and
gradients w.r.t. every input), and the hand-written backward of LinearScan."""
import sys

import pytest
import torch
import torch.nn.functional as F

import HoloMambaRec as H

TOL = {torch.float64: dict(rtol=1e-5, atol=1e-5), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def scan_inputs(l, dtype, b=2, d=3, n=4, with_state=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, d, generator=g, dtype=torch.float64)
    delta = F.softplus(torch.randn(b, l, d, generator=g, dtype=torch.float64) - 1)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1
    B = torch.randn(b, l, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, l, n, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    inputs = [u, delta, A, B, C, D]
    if with_state:
        inputs.append(torch.randn(b, d, n, generator=g, dtype=torch.float64))
    return [t.to(dtype).requires_grad_() for t in inputs]


def scalar_loss(y, h, seed=1):
    """A random linear functional of the outputs and of the final state (so both carry gradient)."""
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    wh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    return (y * wy).sum() + (h * wh).sum()


def run(scan, inputs):
    u, delta, A, B, C, D, *state = inputs
    y, h = scan(u, delta, A, B, C, D, state[0] if state else None)
    grads = torch.autograd.grad(scalar_loss(y, h), inputs)
    return y, h, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("l", [1, 7, 33])
def test_parallel_scan_matches_reference(l, with_state, dtype):
    inputs = scan_inputs(l, dtype, with_state=with_state)
    y_ref, h_ref, g_ref = run(H.selective_scan_reference, inputs)
    y, h, grads = run(H.selective_scan_parallel, inputs)
    assert y.shape == y_ref.shape == (2, l, 3) and h.shape == h_ref.shape == (2, 3, 4)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h.to(dtype), h_ref, **TOL[dtype])
    names = ["u", "delta", "A", "B", "C", "D", "state"]
    for name, g, gr in zip(names, grads, g_ref):
        torch.testing.assert_close(g, gr, **TOL[dtype], msg=lambda m, name=name: f"grad {name}: {m}")


def test_reference_scan_matches_hand_unrolled_recurrence():
    # two steps of h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t ; y_t = C_t · h_t + D x_t, written out
    u, delta, A, B, C, D, s = (t.detach() for t in scan_inputs(2, torch.float64, b=1, d=1, n=2, with_state=True))
    h = s[0, 0]
    ys = []
    for t in range(2):
        h = torch.exp(delta[0, t, 0] * A[0]) * h + delta[0, t, 0] * u[0, t, 0] * B[0, t]
        ys.append((C[0, t] * h).sum() + D[0] * u[0, t, 0])
    y, h_last = H.selective_scan_reference(u, delta, A, B, C, D, s)
    torch.testing.assert_close(y[0, :, 0], torch.stack(ys), rtol=0, atol=1e-12)
    torch.testing.assert_close(h_last[0, 0], h, rtol=0, atol=1e-12)


def test_scan_state_chains_across_chunks():
    # scanning [first half] then [second half] from the carried state equals one scan over the whole
    u, delta, A, B, C, D = (t.detach() for t in scan_inputs(12, torch.float32))
    y_all, h_all = H.selective_scan_parallel(u, delta, A, B, C, D)
    y1, h1 = H.selective_scan_parallel(u[:, :5], delta[:, :5], A, B[:, :5], C[:, :5], D)
    y2, h2 = H.selective_scan_parallel(u[:, 5:], delta[:, 5:], A, B[:, 5:], C[:, 5:], D, h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h_all, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("l", [1, 5, 8, 13])
def test_inclusive_scan_matches_loop(l):
    g = torch.Generator().manual_seed(l)
    decay = torch.rand(2, l, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, l, 3, generator=g, dtype=torch.float64)
    h, expected = torch.zeros(2, 3, dtype=torch.float64), []
    for t in range(l):
        h = decay[:, t] * h + x[:, t]
        expected.append(h)
    torch.testing.assert_close(H.LinearScan.apply(decay, x), torch.stack(expected, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("l", [1, 6, 9])
def test_linear_scan_gradcheck(l):
    g = torch.Generator().manual_seed(10 + l)
    decay = (torch.rand(2, l, 3, 2, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    x = torch.randn(2, l, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(H.LinearScan.apply, (decay, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_pick_scan_backend_on_cpu():
    cpu = torch.device("cpu")
    assert H.pick_scan_backend("auto", cpu) == "reference"  # the fastest scan on a CPU
    assert H.pick_scan_backend("reference", cpu) == "reference"
    with pytest.raises(H.ConfigError, match="scan_backend=cuda"):
        H.pick_scan_backend("cuda", cpu)


@pytest.mark.parametrize("length,chunk", [(130, 64), (300, 64), (257, 32)])
def test_chunked_scan_carries_state_across_chunks(length, chunk):
    """Lengths beyond one chunk: the chunked scan equals the plain doubling scan and a step-by-step loop."""
    g = torch.Generator().manual_seed(length)
    decay = torch.rand(2, length, 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, length, 3, 4, generator=g, dtype=torch.float64)
    h, loop = torch.zeros(2, 3, 4, dtype=torch.float64), []
    for t in range(length):
        h = decay[:, t] * h + x[:, t]
        loop.append(h)
    expected = torch.stack(loop, dim=1)
    torch.testing.assert_close(H._inclusive_scan(decay, x, chunk=chunk), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(H._doubling_scan(decay, x), expected, rtol=1e-10, atol=1e-10)


def test_kernel_module_imports_without_its_package_init(tmp_path, monkeypatch):
    """import_kernel_module loads a package's submodule without the package's __init__ (mamba-ssm's imports
    transformers), with torch.compile as the identity while it loads, and leaves sys.modules as it found it: a
    later plain import runs the __init__ and gets the whole package."""
    package = tmp_path / "heavy_pkg"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("import sys\nsys.modules['heavy_pkg_init_ran'] = sys\nFULL = True\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "kernel.py").write_text(
        "import torch\n@torch.compile(fullgraph=True, dynamic=True)\ndef double(x):\n    return 2 * x\n"
        "plain = torch.compile(abs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("heavy_pkg", "heavy_pkg.ops", "heavy_pkg.ops.kernel", "heavy_pkg_init_ran"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    compile_, before = torch.compile, set(sys.modules)
    kernel = H.import_kernel_module("heavy_pkg.ops.kernel")
    assert kernel.double(21) == 42 and kernel.plain is abs  # undecorated: torch.compile was the identity
    assert torch.compile is compile_ and set(sys.modules) == before  # the __init__ never ran, nothing stays
    import heavy_pkg.ops.kernel
    assert heavy_pkg.FULL and "heavy_pkg_init_ran" in sys.modules
    assert heavy_pkg.ops.kernel is not kernel and heavy_pkg.ops.kernel.plain is not abs  # compiled this time
    with pytest.raises(ImportError):
        H.import_kernel_module("no_such_package_here.ops")
