"""The CUDA kernels (compiled qmerge._C_cuda, and the same source through CuPy) against the
reference. Skipped without a CUDA device; each test runs once per CUDA backend present.

QMERGE_EXPECT_CUDA_BACKENDS=native,cupy makes a missing backend a failure (the GPU run sets it,
so a kernel that failed to build cannot pass by being skipped).
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qmerge import ops
from qmerge.ops import _cupy
from tests.conftest import DTYPES
from tests.ops.helpers import assert_within_eager, make_signs, route_coeffs, sign_eager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _present() -> list[str]:
    if not torch.cuda.is_available():
        return []
    out = []
    if ops.backend()["cuda"] == "native":
        out.append("native")
    if _cupy.available() is None:
        out.append("cupy")
    return out


def test_expected_backends_are_present():
    want = [b for b in os.environ.get("QMERGE_EXPECT_CUDA_BACKENDS", "").split(",") if b]
    missing = [b for b in want if b not in _present()]
    assert not missing, f"CUDA backends missing: {missing} ({ops.backend()})"


@pytest.fixture(params=["native", "cupy"])
def impl(request):
    """The four CUDA entry points of one backend."""
    if request.param not in _present():
        pytest.skip(f"CUDA backend {request.param} not present here ({ops.backend()})")
    if request.param == "native":
        q = torch.ops.qmerge
        return SimpleNamespace(
            dequant_add_sign=q.dequant_add_sign,
            dequant_add_sign_out=q.dequant_add_sign_out,
            sign_linear=q.sign_linear,
            lowrank_linear=q.lowrank_linear,
        )
    return _cupy


def cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


# --- dequant_add_sign -------------------------------------------------------------------------

DEQUANT = [  # (out, in, T, scale rows R (0: per row), groups)
    (1, 1, 1, 0, 1),
    (17, 13, 2, 0, 1),
    (64, 128, 3, 0, 4),
    (33, 100, 2, 1, 7),
    (5, 8, 4, 0, 8),
    (300, 264, 1, 0, 3),
    (70, 4096, 2, 0, 1),
    (3, 40, 0, 0, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DEQUANT, ids=str)
def test_dequant_is_the_reference_bit_for_bit(impl, dtype, case):
    """Same fp32 sums in the same task order, one round-to-nearest-even: identical bits."""
    out, inn, tasks, rows, groups = case
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn, scale_rows=rows or None, groups=groups)
    alphas = torch.rand(tasks) + 0.5
    want = ops.reference.dequant_add_sign(base, packed, scales, alphas)
    got = impl.dequant_add_sign(*cuda(base, packed, scales, alphas))
    assert got.dtype == dtype and torch.equal(got.cpu(), want)
    # in place (out = base) and into a separate buffer
    b, p, s, a = cuda(base, packed, scales, alphas)
    impl.dequant_add_sign_out(b, p, s, a, b)
    assert torch.equal(b.cpu(), want)
    dst = torch.empty_like(b)
    impl.dequant_add_sign_out(*cuda(base, packed, scales, alphas), dst)
    assert torch.equal(dst.cpu(), want)


def test_dequant_unaligned_views_take_the_scalar_path(impl):
    base = torch.randn(9, 65)[:, 1:].contiguous()  # 64 columns
    storage = torch.empty(9 * 64 + 1).cuda()
    view = storage[1:].view(9, 64)  # 4-byte aligned only
    view.copy_(base.cuda())
    packed, scales = make_signs(2, 9, 64)
    alphas = torch.ones(2)
    want = ops.reference.dequant_add_sign(base, packed, scales, alphas)
    got = impl.dequant_add_sign(view, *cuda(packed, scales, alphas))
    assert torch.equal(got.cpu(), want)


# --- sign_linear --------------------------------------------------------------------------------

# (rows N, out, in, tasks T, groups): gemv (N <= 2, fp32, groups not 16-aligned), mma (N >= 3;
# 16-byte bit loads when in is a multiple of 128 and groups of 128).
SIGN = [
    (1, 16, 24, 1, 1),
    (3, 9, 13, 2, 1),
    (5, 32, 77, 3, 4),
    (8, 40, 64, 8, 1),
    (9, 17, 100, 5, 3),
    (30, 24, 45, 4, 1),
    (64, 20, 40, 2, 2),
    (300, 12, 33, 8, 1),
    (16, 32, 64, 4, 1),
    (64, 48, 128, 64, 1),
    (100, 40, 96, 5, 3),
    (37, 24, 45, 3, 1),
    (50, 20, 40, 2, 3),
    (70, 130, 256, 6, 2),
    (12, 8, 4096, 2, 1),
    (3, 40, 256, 2, 1),
    (4, 33, 512, 3, 4),
    (2, 24, 1000, 2, 1),
]


def _sign_check(impl, x, base, packed, scales, bias=None, **route):
    y = impl.sign_linear(
        *cuda(x, base, packed, scales),
        cuda(route.get("task_ids"))[0],
        cuda(route.get("coeffs"))[0],
        cuda(bias)[0],
    )
    assert y.dtype == x.dtype and y.shape == (x.shape[0], base.shape[0]) and y.is_cuda
    exact = ops.reference.sign_linear(
        x.float(),
        base.float(),
        packed,
        scales,
        bias=None if bias is None else bias.float(),
        **{k: (v.float() if k == "coeffs" else v) for k, v in route.items()},
    )
    c = route_coeffs(route, x.shape[0], packed.shape[0])
    eager = sign_eager(x, base, packed, scales, c, bias)
    assert_within_eager(y.cpu(), exact, eager, str(route.keys()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIGN, ids=str)
def test_sign_linear_task_ids(impl, dtype, case):
    rows, out, inn, tasks, groups = case
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn, groups=groups)
    x = torch.randn(rows, inn).to(dtype)
    ids = torch.randint(-1, tasks, (rows,))
    _sign_check(impl, x, base, packed, scales, task_ids=ids)
    _sign_check(impl, x, base, packed, scales, bias=torch.randn(out), task_ids=ids.to(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIGN, ids=str)
def test_sign_linear_mixtures(impl, dtype, case):
    rows, out, inn, tasks, groups = case
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn, scale_rows=1 if tasks % 2 else None, groups=groups)
    x = torch.randn(rows, inn).to(dtype)
    coeffs = torch.rand(rows, tasks) * (torch.rand(rows, tasks) > 0.4)
    _sign_check(impl, x, base, packed, scales, bias=torch.randn(out), coeffs=coeffs)


def test_sign_linear_one_task_for_all_rows(impl):
    """The serving case: a batch of one task on tensor cores equals the rebuilt weight's GEMM."""
    base = torch.randn(96, 256).to(torch.bfloat16)
    packed, scales = make_signs(3, 96, 256)
    x = torch.randn(64, 256).to(torch.bfloat16)
    _sign_check(impl, x, base, packed, scales, task_ids=torch.full((64,), 2))


def test_sign_linear_empty_batch(impl):
    base = torch.randn(8, 16).cuda()
    packed, scales = cuda(*make_signs(1, 8, 16))
    y = impl.sign_linear(
        torch.empty(0, 16).cuda(),
        base,
        packed,
        scales,
        torch.empty(0, dtype=torch.long).cuda(),
        None,
        None,
    )
    assert y.shape == (0, 8)


def test_sign_linear_refuses_a_cpu_argument(impl):
    base = torch.randn(8, 16).cuda()
    packed, scales = make_signs(1, 8, 16)
    with pytest.raises(ValueError, match="'packed' must be on the device of 'x'"):
        impl.sign_linear(
            torch.randn(2, 16).cuda(),
            base,
            packed,
            scales.cuda(),
            torch.zeros(2, dtype=torch.long).cuda(),
            None,
            None,
        )


# --- lowrank_linear ---------------------------------------------------------------------------

LOWRANK = [
    (1, 16, 24, 1, 4),
    (7, 33, 65, 3, 8),
    (20, 12, 40, 2, 16),
    (40, 9, 19, 5, 3),
    (64, 96, 512, 8, 16),
    (3, 64, 4096, 2, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LOWRANK, ids=str)
@pytest.mark.parametrize("route", ["ids", "coeffs"])
def test_lowrank_linear(impl, dtype, case, route):
    rows, out, inn, tasks, r = case
    base = torch.randn(out, inn).to(dtype)
    U = (torch.randn(tasks, out, r) * 0.1).to(dtype)
    V = (torch.randn(tasks, r, inn) * 0.1).to(dtype)
    x = torch.randn(rows, inn).to(dtype)
    bias = torch.randn(out)
    kw = (
        {"task_ids": torch.randint(-1, tasks, (rows,))}
        if route == "ids"
        else {"coeffs": torch.randn(rows, tasks) * (torch.rand(rows, tasks) > 0.3)}
    )
    for rank in (None, max(r - 2, 0), 0):
        y = impl.lowrank_linear(
            *cuda(x, base, U, V),
            cuda(kw.get("task_ids"))[0],
            cuda(kw.get("coeffs"))[0],
            cuda(bias)[0],
            rank,
        )
        exact = ops.reference.lowrank_linear(
            x.float(), base.float(), U.float(), V.float(), bias=bias, rank=rank, **kw
        )
        rk = r if rank is None else rank
        c = (
            F.one_hot(kw["task_ids"].clamp(min=0), tasks).float() * (kw["task_ids"] >= 0)[:, None]
            if route == "ids"
            else kw["coeffs"]
        )
        deltas = U[:, :, :rk].float() @ V[:, :rk].float()
        w = base.float()[None] + torch.einsum("nt,toi->noi", c, deltas)
        eager = torch.stack(
            [F.linear(x[n : n + 1], w[n].to(dtype), bias.to(dtype))[0] for n in range(rows)]
        )
        assert_within_eager(y.cpu(), exact, eager, f"rank={rank}")


# --- dispatch and errors ----------------------------------------------------------------------


def test_torch_ops_dispatch_to_the_cuda_kernels():
    """torch.ops.qmerge on CUDA tensors runs the backend that backend() names, not the
    reference: a reference run would leave no CUDA kernel of ours in the profile."""
    backend = ops.backend()["cuda"]
    if backend == "reference":
        pytest.skip(f"no CUDA kernels here ({ops.backend()})")
    base = torch.randn(64, 64).cuda()
    packed, scales = cuda(*make_signs(2, 64, 64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.dequant_add_sign(base, packed, scales, torch.ones(2).cuda())
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert any("qm_dequant_f32" in n for n in names), sorted(names)[:20]


@pytest.mark.parametrize("backend", ["native", "cupy"])
def test_backend_variable_and_bad_task_id_fails_loudly(backend):
    """QMERGE_CUDA_BACKEND picks the backend; an out-of-range task id stops the kernel with a
    message naming the op and the id (a device-side error, like torch's indexing), in a
    subprocess because it leaves the CUDA context unusable."""
    if backend not in _present():
        pytest.skip(f"CUDA backend {backend} not present here")
    code = (
        "import torch\n"
        "from qmerge import ops\n"
        f"assert ops.backend()['cuda'] == {backend!r}, ops.backend()\n"
        "x = torch.randn(2, 16).cuda(); w = torch.randn(8, 16).cuda()\n"
        "p = torch.zeros(1, 8, 2, dtype=torch.uint8).cuda(); s = torch.ones(1, 8, 1).cuda()\n"
        "y = ops.sign_linear(x, w, p, s, task_ids=torch.tensor([0, 5]).cuda())\n"
        "torch.cuda.synchronize()\n"
    )
    env = {**os.environ, "QMERGE_CUDA_BACKEND": backend}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "qmerge.sign_linear: 'task_ids'[1] = 5 is out of range" in out.stdout + out.stderr
