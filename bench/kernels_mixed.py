"""The mixed-batch table of bench/kernels.py: sign_linear over N rows of T tasks (rows in random
task order, as a decoding batch of several tasks' sequences), each against the base-only GEMM of
the same N (torch F.linear) and against the path the op took before the lookup-table path
(QMERGE_SIGN_PATH=per_task: fused passes, a rebuilt weight for tasks of 24+ rows), timed in turns.

Also fits the cost model's constants (csrc/cpu/sign_path.cpp, SignCosts) from the 4096x4096
rows: the GEMM's and the lookup kernel's multiply-add rates per core and the fused passes'.

Run alone, it writes the fp32 table (SmolLM2-135M's shapes, the serve benchmark's fp32 model:
32 rows over 5 tasks and neighbours) and the fp32 constants to
bench/results/kernels-mixed-fp32.md:

    .venv/bin/python -m bench.kernels_mixed
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench._timing import timeit_alternating
from qmerge import ops

SHAPES = [(4096, 4096), (576, 576), (1536, 576), (576, 1536)]  # (out, in): SmolLM2-135M's
ROWS = [16, 32, 64]
TASKS = [1, 4, 8, 16]
DTYPE = torch.bfloat16
PATHS = ["auto", "lut", "per_task"]


def _forced(path: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        os.environ["QMERGE_SIGN_PATH"] = path
        try:
            return fn()
        finally:
            os.environ.pop("QMERGE_SIGN_PATH", None)

    return call


def bench_mixed(
    cold: bool,
    log: Callable[[str], None],
    quick: bool = False,
    dtype: torch.dtype = DTYPE,
    grid: tuple[list, list, list] = (SHAPES, ROWS, TASKS),
) -> list[dict]:
    shapes, rows_, tasks_ = grid
    shapes = [(1024, 1024)] if quick else shapes
    out_rows = []
    for out, inn in shapes:
        base = torch.randn(out, inn).to(dtype)
        packed = ops.pack_signs(torch.randn(16, out, inn))
        scales = torch.rand(16, out, 1) * 0.01 + 0.001
        for n in rows_:
            x = torch.randn(n, inn).to(dtype)
            for t in tasks_:
                ids = (torch.arange(n) % t)[torch.randperm(n)]
                p, s = packed[:t], scales[:t]
                fns = [lambda x=x, base=base: F.linear(x, base)]
                for path in PATHS:
                    fns.append(
                        _forced(
                            path,
                            lambda x=x, w=base, p=p, s=s, ids=ids: ops.sign_linear(
                                x, w, p, s, task_ids=ids
                            ),
                        )
                    )
                big = out * inn >= 4096 * 4096
                times = timeit_alternating(
                    fns, cold, min_reps=8 if big else 16, budget_s=1.0, shuffle=True
                )
                row = dict(shape=f"{out}x{inn}", out=out, inn=inn, n=n, t=t, gemm=times[0])
                row.update(zip(PATHS, times[1:], strict=True))
                out_rows.append(row)
                log(
                    f"  {out}x{inn} N={n} T={t}: GEMM {times[0] * 1e3:.2f} ms, "
                    + ", ".join(f"{k} {row[k] / times[0]:.2f}x" for k in PATHS)
                )
    return out_rows


def fit_constants(rows: list[dict], gemv8_s: float) -> list[str]:
    """SignCosts from the 4096x4096 rows (one core's rates; torch's threads share the work);
    gemv8_s: qmerge's base-only GEMV of 8 rows at 4096x4096 (the lookup path's base product up
    to 8 rows)."""
    threads = torch.get_num_threads()
    big = [r for r in rows if r["shape"] == "4096x4096"]
    if not big:
        return []
    macs = 4096 * 4096
    gemm = max(r["n"] * macs / r["gemm"] for r in big) / threads
    gemm_bw = 2 * macs / min(r["gemm"] for r in big)  # bf16 weight bytes / fastest GEMM
    lut = [r["n"] * macs / max(r["lut"] - r["gemm"], 1e-6) / threads for r in big if r["n"] >= 32]
    fused = [r["n"] * macs / r["per_task"] / threads for r in big if r["t"] >= 8]
    lut_rate = sorted(lut)[len(lut) // 2]
    fused_rate = sorted(fused)[len(fused) // 2]
    return [
        f"- base GEMM (best N): {gemm / 1e9:.0f} GMAC/s per core; at N=16 it reads the weight "
        f"at {gemm_bw / 1e9:.0f} GB/s",
        f"- lookup path over the GEMM (median, N >= 32): {lut_rate / 1e9:.0f} G sign-MAC/s "
        "per core",
        f"- per-task path at T >= 8 (fused passes, median): {fused_rate / 1e9:.1f} GMAC/s per core",
        f"- qmerge's base-only GEMV at N=8: {8 * macs / gemv8_s / threads / 1e9:.0f} GMAC/s "
        "per core",
    ]


def table(rows: list[dict]) -> list[str]:
    out = [
        "| shape (out x in) | N | T | base GEMM ms | auto | lut | per_task (before) "
        "| auto's gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["gemm"]
        out.append(
            f"| {r['shape']} | {r['n']} | {r['t']} | {g * 1e3:.2f} | {r['auto'] / g:.2f}x | "
            f"{r['lut'] / g:.2f}x | {r['per_task'] / g:.2f}x | {r['per_task'] / r['auto']:.1f}x |"
        )
    return out


def verdicts(rows: list[dict]) -> list[str]:
    def find(n: int, t: int) -> dict:
        return next(r for r in rows if r["shape"] == "4096x4096" and r["n"] == n and r["t"] == t)

    out = []
    for n, t, limit in ((32, 8, 1.3), (64, 16, 1.4)):
        r = find(n, t)
        ratio = r["auto"] / r["gemm"]
        verdict = "PASS" if ratio <= limit else "FAIL"
        out.append(
            f"| sign_linear N={n} over {t} tasks <= {limit}x the base GEMM at N={n} | "
            f"{ratio:.2f}x | {verdict} |"
        )
    return out


F32_GRID = ([(576, 576), (192, 576), (1536, 576), (576, 1536)], [8, 32, 64], [1, 5])


def fit_f32(rows: list[dict]) -> list[str]:
    """SignCosts at fp32 (one core's rates, medians over the shapes)."""
    threads = torch.get_num_threads()

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    macs = [r["n"] * r["out"] * r["inn"] for r in rows]
    gemm = med([m / r["gemm"] / threads for m, r in zip(macs, rows, strict=True) if r["n"] == 32])
    lut = med(
        [
            m / max(r["lut"] - r["gemm"], 1e-7) / threads
            for m, r in zip(macs, rows, strict=True)
            if r["n"] >= 32
        ]
    )
    fused = med(
        [m / r["per_task"] / threads for m, r in zip(macs, rows, strict=True) if r["t"] == 5]
    )
    bw = med([4 * r["out"] * r["inn"] / r["gemm"] for r in rows if r["n"] == 8])
    return [
        f"- fp32 GEMM at N=32: {gemm / 1e9:.0f} GMAC/s per core; at N=8 it reads the weight at "
        f"{bw / 1e9:.0f} GB/s",
        f"- fp32 lookups over the GEMM (N >= 32): {lut / 1e9:.0f} G sign-MAC/s per core",
        f"- per-task path over 5 tasks (fused passes): {fused / 1e9:.1f} GMAC/s per core",
    ]


def main() -> None:
    from pathlib import Path

    from bench.common import results_log

    torch.manual_seed(0)
    cmd = "`.venv/bin/python -m bench.kernels_mixed`"
    lines, log = results_log(
        "Mixed batches at fp32: sign_linear over N rows of T tasks",
        cmd,
        f"{torch.get_num_threads()} threads; qmerge kernels {ops.backend()['cpu']}",
    )
    log()
    log(
        "SmolLM2-135M's shapes (the serve benchmark's fp32 model). fp32 rows take fp32 tables "
        "on the lookup path (csrc/cpu/kernels/sign_lut_f32.h). Each cell is a multiple of the "
        "base-only F.linear of the same N; calls timed in turns, in a new order each round."
    )
    log()
    rows = bench_mixed(False, print, dtype=torch.float32, grid=F32_GRID)
    for line in table(rows):
        log(line)
    log()
    log("Cost-model constants measured here (csrc/cpu/sign_path.cpp, SignCosts, fp32):")
    log()
    for line in fit_f32(rows):
        log(line)
    out = Path(__file__).parent / "results" / "kernels-mixed-fp32.md"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
