"""GPU kernel benchmark: qmerge's CUDA ops vs this GPU's ceilings and vs the torch ways.

Run:  python -m bench.kernels_gpu              (writes bench/results/kernels-<gpu>.md, e.g. -h100)
      python -m bench.kernels_gpu --quick      (one shape, prints only)

Measured in one run, bf16: device-to-device copy bandwidth (torch copy of 1 GiB) and the
cuBLAS base-only F.linear at each batch size; then per shape: dequant_add_sign (1 task) in GB/s
and as a fraction of copy bandwidth, next to the torch shift-unpack way; sign_linear at N = 1, 8,
64 rows with 1, 8, 64 distinct tasks vs cuBLAS base-only and vs the torch per-request loop
(materialize each row's weight, F.linear); lowrank_linear rank 16 at N = 64 with 8 and 64 tasks
vs base-only. Every timed call starts with L2 flushed (a 256 MiB buffer is rewritten before it);
times are medians of CUDA-event timings, the calls a ratio compares timed in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import qmerge
from bench._timing import copy_bandwidth
from qmerge import ops

SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192)]
DTYPE = torch.bfloat16
ROUTES = [(1, 1), (8, 1), (8, 8), (64, 1), (64, 8), (64, 64)]  # (rows N, distinct tasks)
MAX_TASKS = 64


def flusher() -> Callable[[], None]:
    buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    state = {"k": 0}

    def flush() -> None:
        state["k"] += 1
        buf.fill_(state["k"] & 0xFF)

    return flush


def time_turns(
    fns: list[Callable[[], object]], flush: Callable[[], None], reps: int = 15
) -> list[float]:
    """Median milliseconds of each fn (CUDA events), one call of each per round, L2 flushed."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    events = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            flush()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            events[k].append((a, b))
    torch.cuda.synchronize()
    return [statistics.median(a.elapsed_time(b) for a, b in ev) for ev in events]


def make_tasks(out: int, inn: int, tasks: int):
    base = (torch.randn(out, inn, device="cuda") * 0.02).to(DTYPE)
    packed = torch.randint(0, 256, (tasks, out, (inn + 7) // 8), dtype=torch.uint8, device="cuda")
    scales = torch.rand(tasks, out, 1, device="cuda") * 1e-3
    return base, packed, scales


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def naive_shift(base, packed, scales, alphas):
    """What a user writes today: shift-unpack each task, scale, add (torch ops)."""
    out, inn = base.shape
    shifts = _SHIFTS.setdefault(base.device, torch.arange(8, dtype=torch.uint8, device=base.device))
    w = base
    for t in range(packed.shape[0]):
        bits = ((packed[t].unsqueeze(-1) >> shifts) & 1).reshape(out, -1)[:, :inn]
        w = w + (alphas[t] * scales[t]).to(base.dtype) * (bits.to(base.dtype) * 2 - 1)
    return w


def per_request_loop(x, base, packed, scales, ids_list):
    """The torch per-request way: materialize each row's weight, then F.linear."""
    one = torch.ones(1, device=x.device)
    rows = []
    for n, t in enumerate(ids_list):
        w = naive_shift(base, packed[t : t + 1], scales[t : t + 1], one)
        rows.append(F.linear(x[n : n + 1], w))
    return torch.cat(rows)


def bench_shape(out: int, inn: int, bw: float, flush, log, loop_rows: int) -> list[dict]:
    rows: list[dict] = []
    shape = f"{out}x{inn}"
    base, packed, scales = make_tasks(out, inn, MAX_TASKS)
    w_bytes = out * inn * 2
    bits_bytes = out * ((inn + 7) // 8)

    # dequant_add_sign, one task
    one = torch.ones(1, device="cuda")
    p1, s1 = packed[:1].contiguous(), scales[:1].contiguous()
    dst = torch.empty_like(base)
    ms, ms_naive = time_turns(
        [
            lambda: ops.dequant_add_sign(base, p1, s1, one, out=dst),
            lambda: naive_shift(base, p1, s1, one),
        ],
        flush,
    )
    gbs = (2 * w_bytes + bits_bytes) / (ms * 1e-3) / 1e9
    rows.append(
        {
            "shape": shape,
            "op": "dequant_add_sign T=1",
            "ms": ms,
            "gbs": gbs,
            "frac_copy": gbs / bw,
            "torch": f"shift-unpack {ms_naive:.3f}",
            "ratio": ms_naive / ms,
        }
    )
    log(
        f"{shape} dequant T=1: {ms:.3f} ms, {gbs:.0f} GB/s ({gbs / bw:.2f} of copy); "
        f"torch {ms_naive:.3f} ms"
    )

    # the first step of the N >= 3 paths: cuBLAS x W^T with fp32 output, vs F.linear's bf16
    x64 = torch.randn(64, inn, device="cuda").to(DTYPE)
    ms32, ms16 = time_turns(
        [lambda: torch.mm(x64, base.T, out_dtype=torch.float32), lambda: F.linear(x64, base)], flush
    )
    rows.append(
        {
            "shape": shape,
            "op": "cuBLAS x W^T N=64, fp32 out",
            "ms": ms32,
            "base_ms": ms16,
            "vs_base": ms32 / ms16,
        }
    )
    log(f"{shape} cuBLAS fp32-out N=64: {ms32:.3f} ms vs bf16 out {ms16:.3f}")

    # sign_linear: N rows over k distinct tasks vs base-only cuBLAS and the per-request loop
    for n, k in ROUTES:
        x = (torch.randn(n, inn, device="cuda")).to(DTYPE)
        ids_list = [i % k for i in range(n)]
        ids = torch.tensor(ids_list, device="cuda")
        fns = [
            lambda x=x, ids=ids: ops.sign_linear(x, base, packed, scales, task_ids=ids),
            lambda x=x: F.linear(x, base),
        ]
        if n <= loop_rows:
            fns.append(lambda x=x, il=ids_list: per_request_loop(x, base, packed, scales, il))
        times = time_turns(fns, flush, reps=15 if n <= 8 else 9)
        floor = (w_bytes + k * bits_bytes) / w_bytes
        row = {
            "shape": shape,
            "op": f"sign_linear N={n}, {k} task(s)",
            "ms": times[0],
            "base_ms": times[1],
            "vs_base": times[0] / times[1],
            "byte_floor": floor,
        }
        if len(times) > 2:
            row["loop_ms"] = times[2]
            row["vs_loop"] = times[2] / times[0]
        rows.append(row)
        log(
            f"{shape} sign_linear N={n} T={k}: {times[0]:.3f} ms = {times[0] / times[1]:.2f}x "
            f"base {times[1]:.3f} (bytes floor {floor:.2f}x)"
            + (f", loop {times[2]:.2f} ms ({times[2] / times[0]:.0f}x)" if len(times) > 2 else "")
        )

    # lowrank_linear rank 16, N = 64, 8 and 64 tasks
    for k in (8, 64):
        U = (torch.randn(k, out, 16, device="cuda") * 0.01).to(DTYPE)
        V = (torch.randn(k, 16, inn, device="cuda") * 0.01).to(DTYPE)
        x = torch.randn(64, inn, device="cuda").to(DTYPE)
        ids = torch.arange(64, device="cuda") % k
        ms, ms_base = time_turns(
            [
                lambda x=x, U=U, V=V, ids=ids: ops.lowrank_linear(x, base, U, V, task_ids=ids),
                lambda x=x: F.linear(x, base),
            ],
            flush,
        )
        floor = (w_bytes + k * 16 * (out + inn) * 2) / w_bytes
        rows.append(
            {
                "shape": shape,
                "op": f"lowrank_linear r=16 N=64, {k} tasks",
                "ms": ms,
                "base_ms": ms_base,
                "vs_base": ms / ms_base,
                "byte_floor": floor,
            }
        )
        log(
            f"{shape} lowrank r=16 N=64 T={k}: {ms:.3f} ms = {ms / ms_base:.2f}x base "
            f"(bytes floor {floor:.2f}x)"
        )

    # the CuPy path of the same kernels, where present (N=1 and the dequant)
    from qmerge.ops import _cupy

    if _cupy.available() is None:
        x = torch.randn(1, inn, device="cuda").to(DTYPE)
        ids = torch.zeros(1, dtype=torch.long, device="cuda")
        ms_c, ms_b, ms_d = time_turns(
            [
                lambda: _cupy.sign_linear(x, base, packed, scales, ids, None, None),
                lambda: F.linear(x, base),
                lambda: _cupy.dequant_add_sign_out(base, p1, s1, one, dst),
            ],
            flush,
        )
        rows.append(
            {
                "shape": shape,
                "op": "CuPy path: sign_linear N=1, 1 task",
                "ms": ms_c,
                "base_ms": ms_b,
                "vs_base": ms_c / ms_b,
            }
        )
        gbs = (2 * w_bytes + bits_bytes) / (ms_d * 1e-3) / 1e9
        rows.append(
            {
                "shape": shape,
                "op": "CuPy path: dequant_add_sign T=1",
                "ms": ms_d,
                "gbs": gbs,
                "frac_copy": gbs / bw,
            }
        )
        log(
            f"{shape} cupy: sign_linear N=1 {ms_c / ms_b:.2f}x base; dequant {gbs / bw:.2f} of copy"
        )
    return rows


def find(rows, shape, op):
    return next(r for r in rows if r["shape"] == shape and r["op"] == op)


def verdicts(rows: list[dict]) -> list[str]:
    out = ["| target | measured | |", "|---|---|---|"]

    def line(name, value, ok, fmt="{:.3f}"):
        out.append(f"| {name} | {fmt.format(value)} | {'PASS' if ok else 'MISS'} |")

    big = "8192x8192"
    d = find(rows, big, "dequant_add_sign T=1")
    line(
        "dequant_add_sign 8192x8192 T=1 >= 0.85 of copy bandwidth",
        d["frac_copy"],
        d["frac_copy"] >= 0.85,
        "{:.2f}",
    )
    for shape in {r["shape"] for r in rows}:
        s = find(rows, shape, "sign_linear N=1, 1 task(s)")
        line(
            f"sign_linear N=1, 1 task <= 1.1x cuBLAS base GEMV ({shape})",
            s["vs_base"],
            s["vs_base"] <= 1.1,
            "{:.3f}x",
        )
    s = find(rows, big, "sign_linear N=64, 64 task(s)")
    line(
        "sign_linear N=64, 64 tasks, 8192x8192 <= 2x base GEMM "
        f"(bytes floor {s['byte_floor']:.2f}x)",
        s["vs_base"],
        s["vs_base"] <= 2.0,
        "{:.2f}x",
    )
    if "vs_loop" in s:
        line(
            "sign_linear N=64, 64 tasks, 8192x8192 >= 10x faster than the per-request loop",
            s["vs_loop"],
            s["vs_loop"] >= 10,
            "{:.0f}x",
        )
    for k in (8, 64):
        lr = find(rows, big, f"lowrank_linear r=16 N=64, {k} tasks")
        line(
            f"lowrank_linear r=16 N=64 ({k} tasks), 8192x8192 <= 1.15x base "
            f"(bytes floor {lr['byte_floor']:.2f}x)",
            lr["vs_base"],
            lr["vs_base"] <= 1.15,
            "{:.3f}x",
        )
    return out


def table(rows: list[dict]) -> list[str]:
    out = [
        "| shape | op | qmerge ms | GB/s (frac of copy) | cuBLAS base ms "
        "| vs base (bytes floor) | torch loop ms (qmerge faster by) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gb = f"{r['gbs']:.0f} ({r['frac_copy']:.2f})" if "gbs" in r else ""
        base = f"{r['base_ms']:.3f}" if "base_ms" in r else ""
        vs = f"{r['vs_base']:.2f}x" if "vs_base" in r else ""
        if "byte_floor" in r:
            vs += f" ({r['byte_floor']:.2f}x)"
        loop = ""
        if "loop_ms" in r:
            loop = f"{r['loop_ms']:.2f} ({r['vs_loop']:.0f}x)"
        elif "torch" in r:
            loop = f"{r['torch']} ({r['ratio']:.0f}x)"
        out.append(f"| {r['shape']} | {r['op']} | {r['ms']:.3f} | {gb} | {base} | {vs} | {loop} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, print only")
    ap.add_argument(
        "--out", type=Path, help="results file (default: bench/results/kernels-<gpu>.md)"
    )
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument(
        "--loop-rows",
        type=int,
        default=64,
        help="time the torch per-request loop up to this many rows (default 64)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"{name}; qmerge backend {ops.backend()}")
    flush = flusher()
    bw = copy_bandwidth(
        1 << 30, "cuda", timer=lambda fn: time_turns([fn], flush, reps=10)[0] * 1e-3
    )
    log(f"copy bandwidth {bw:.0f} GB/s")
    rows: list[dict] = []
    for out, inn in SHAPES[-1:] if args.quick else SHAPES:
        rows += bench_shape(out, inn, bw, flush, log, args.loop_rows)
    if args.json:
        args.json.write_text(json.dumps({"gpu": name, "copy_gbs": bw, "rows": rows}, indent=1))
    if args.quick:
        return 0
    tag = "h200" if "H200" in name else "h100" if "H100" in name else "gpu"
    path = args.out or Path(__file__).parent / "results" / f"kernels-{tag}.md"
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# qmerge CUDA kernels on {name}",
        "",
        "Command: `python -m bench.kernels_gpu` (writes this file; L2 flushed before every timed "
        "call, medians of CUDA-event timings, bf16).",
        "",
        f"- GPU: {name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
        f"CUDA {torch.version.cuda}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, qmerge "
        f"{qmerge.__version__}",
        f"- qmerge backend: {ops.backend()}",
        f"- copy bandwidth (1 GiB device-to-device torch copy, read + write): **{bw:.0f} GB/s**",
        "",
        "## Targets (issue 7)",
        "",
        *verdicts(rows),
        "",
        "## All measurements",
        "",
        *table(rows),
        "",
    ]
    notes = Path(__file__).parent / "results" / "kernels-gpu-notes.md"
    if notes.exists():
        lines += ["## Notes", "", f"See [{notes.name}]({notes.name}).", ""]
    path.write_text("\n".join(lines))
    log(f"wrote {path}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
