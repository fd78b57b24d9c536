"""`qmerge demo`: the ops on one real-sized weight, checked against the reference and timed.

It builds a base weight and T fine-tunes of it, compresses each task vector to 1 bit per
weight plus per-row scales, rebuilds a task's weight, and serves a batch whose rows each ask
for a different task, checking every result against the pure-torch reference and timing it
against the torch way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qmerge import ops
from qmerge.version import __version__


def _median_ms(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (signal.float() - approx.float()).pow(2).sum()
    return float(10 * torch.log10(signal.float().pow(2).sum() / noise))


def demo(
    out_features: int, in_features: int, tasks: int, dtype: torch.dtype, log: Callable[[str], None]
) -> dict:
    torch.manual_seed(0)
    log(f"[1/4] base {out_features}x{in_features} {dtype} and {tasks} fine-tunes")
    base = (torch.randn(out_features, in_features) * 0.02).to(dtype)
    taus = torch.randn(tasks, out_features, in_features) * 0.002  # the task vectors

    log("[2/4] compress each task vector to signs + per-row scales (1 bit/weight)")
    packed = ops.pack_signs(taus)
    scales = taus.abs().mean(-1, keepdim=True)  # L2-optimal per-row scale
    approx = ops.reference.expand_scales(scales, out_features, in_features) * ops.unpack_signs(
        packed, in_features
    )
    bits = (packed.numel() * 8 + scales.numel() * 32) / taus.numel()
    tau_sqnr = _sqnr_db(taus, approx)
    dense_bytes = tasks * base.numel() * base.element_size()
    log(
        f"      {bits:.3f} bits/param, task-vector SQNR {tau_sqnr:.1f} dB, "
        f"{(packed.numel() + scales.numel() * 4) / 2**20:.1f} MiB vs "
        f"{dense_bytes / 2**20:.0f} MiB dense"
    )

    log("[3/4] rebuild task 0's weight with dequant_add_sign")
    one = torch.ones(1)
    w0 = ops.dequant_add_sign(base, packed[:1], scales[:1], one)
    exact = torch.equal(w0, ops.reference.dequant_add_sign(base, packed[:1], scales[:1], one))
    finetuned = base.float() + taus[0]
    weight_sqnr = _sqnr_db(finetuned, w0)
    # Into a reused buffer, as a weight cache does: a fresh 32 MiB output per call would spend
    # most of its time in first-touch page faults.
    buf = torch.empty_like(base)
    t_dq = _median_ms(lambda: ops.dequant_add_sign(base, packed[:1], scales[:1], one, out=buf))
    shifts = torch.arange(8, dtype=torch.uint8)

    def naive() -> torch.Tensor:
        signs = ((packed[0].unsqueeze(-1) >> shifts) & 1).reshape(out_features, -1)
        return base + scales[0].to(dtype) * (signs[:, :in_features].to(dtype) * 2 - 1)

    t_naive = _median_ms(naive, reps=3)
    log(
        f"      {t_dq:.2f} ms (torch shift-unpack {t_naive:.1f} ms, {t_naive / t_dq:.0f}x); "
        f"equals the reference: {exact}; weight SQNR vs the fine-tune {weight_sqnr:.1f} dB"
    )

    log("[4/4] one batch, a different task per row, through sign_linear")
    rows = min(8, tasks + 1)
    x = torch.randn(rows, in_features).to(dtype)
    ids = torch.arange(rows) % (tasks + 1) - 1  # row 0 asks for the bare base
    y = ops.sign_linear(x, base, packed, scales, task_ids=ids)
    ref = ops.reference.sign_linear(x, base, packed, scales, task_ids=ids)
    rel = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    t_fused = _median_ms(lambda: ops.sign_linear(x, base, packed, scales, task_ids=ids))
    t_base = _median_ms(lambda: F.linear(x, base))
    log(
        f"      {rows} rows: {t_fused:.2f} ms (base-only F.linear {t_base:.2f} ms); "
        f"max rel. error vs fp32 reference {rel:.1e}"
    )
    return {
        "shape": [out_features, in_features],
        "dtype": str(dtype).removeprefix("torch."),
        "tasks": tasks,
        "bits_per_param": bits,
        "task_vector_sqnr_db": tau_sqnr,
        "weight_sqnr_db": weight_sqnr,
        "dequant_ms": t_dq,
        "dequant_torch_shift_ms": t_naive,
        "dequant_equals_reference": exact,
        "sign_linear_rows": rows,
        "sign_linear_ms": t_fused,
        "base_linear_ms": t_base,
        "sign_linear_max_rel_error": rel,
        "backend": ops.backend(),
    }


def info() -> dict:
    return {
        "qmerge": __version__,
        "torch": torch.__version__,
        "backend": ops.backend(),
        "isas": ops.supported_isas(),
        "threads": torch.get_num_threads(),
    }
