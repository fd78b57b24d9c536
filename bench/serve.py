"""`qmerge serve` under load on SmolLM2-135M with 5 tasks (bench/routing_llm.py's pack: two
real LM fine-tunes and three synthetic ones), on loopback. Writes bench/results/serve.md.

    .venv/bin/python -m bench.serve [--requests 120] [--clients 32] [--tokens 32]

1. The offline answer of every request: the patched model's own greedy `generate`, one
   request at a time, in this process.
2. The same requests, greedy, against one `qmerge serve` process:
   - one at a time (one client, each request alone in the server);
   - from 32 concurrent clients, tasks mixed (iteration-level batching);
   - and, for comparison, one server process per task (5 processes, same pack, each client
     sending to its task's server), the way one would serve fine-tunes without qmerge.
   Throughput, p50/p99 latency, RSS, and how many answers equal their offline answer.
3. 1000 requests generated from the server's OpenAPI spec (schemathesis, valid and invalid):
   the status codes, no 5xx, and correct answers afterwards.
4. A task removed from, then added to, the served pack on disk: the time until the server
   answers 404, then answers it again (and what it answers).
Load is bounded in count (--requests) and time (--timeout per request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qmerge
from bench._server import Proc, fuzz, load, wait_for
from bench.common import CACHE, smollm2_base

ROOT = Path(__file__).resolve().parent

OUT = ROOT / "results" / "serve.md"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, a dragon",
    "The three laws of motion are",
    "To bake bread, first",
    "In 1969, astronauts",
    "My favourite programming language is",
    "The best way to learn",
    "A good friend is someone who",
    "The meaning of life",
    "When the rain stopped, we",
    "The most important invention of the last century was",
    "Cats and dogs",
    "He opened the door and saw",
    "Water boils at",
    "The stock market today",
    "If I could travel anywhere, I would go to",
    "The old man and the sea",
    "A recipe for happiness:",
    "Never trust a",
    "The moon is",
    "Computers are good at",
    "Yesterday I learned that",
    "The quick brown fox",
]


def requests(tasks: list[str], n: int, tokens: int) -> list[dict]:
    """n greedy completion requests, tasks round-robin over the prompts."""
    return [
        {
            "model": tasks[i % len(tasks)],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": tokens,
            "temperature": 0,
        }
        for i in range(n)
    ]


def summary(name: str, res: list, wall: float, expected: list[str], rss: str) -> dict:
    ok = [r for r in res if r[0] == 200]
    lat = sorted(r[1] for r in ok)
    same = sum(r[2] == e for r, e in zip(res, expected, strict=True))
    tokens = sum(r[3] for r in ok)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {
        "name": name,
        "ok": len(ok),
        "n": len(res),
        "wall": wall,
        "rps": len(ok) / wall,
        "tps": tokens / wall,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "mean": statistics.mean(lat) if lat else float("nan"),
        "same": same,
        "rss": rss,
    }


def offline(base: Path, pack: Path, reqs: list[dict]) -> tuple[list[str], float]:
    from qmerge.verbs.run import tokenizer

    model = qmerge.load(base, pack)
    tok = tokenizer(base)
    texts = []
    t0 = time.perf_counter()
    for r in reqs:
        enc = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                **enc,
                max_new_tokens=r["max_tokens"],
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                task=r["model"],
            )
        texts.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    wall = time.perf_counter() - t0
    model.qmerge.unload()
    return texts, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--fuzz", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    import httpx

    from bench.routing_llm import smollm_tasks

    base = smollm2_base()
    fts = smollm_tasks()
    pack = CACHE / "pack-smollm2-5"
    tasks = list(qmerge.open_pack(pack).tasks)
    reqs = requests(tasks, args.requests, args.tokens)
    lines: list[str] = []

    def log(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    log("# qmerge serve: many task variants from one process")
    log()
    log(
        f"Command: `.venv/bin/python -m bench.serve --requests {args.requests} --clients "
        f"{args.clients} --tokens {args.tokens} --fuzz {args.fuzz}`"
    )
    log()
    log(
        f"Machine: {os.cpu_count()} CPU cores, no GPU; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; qmerge kernels: {qmerge.ops.backend()}. "
        f"Server and load generator run on the same 2 cores."
    )
    log()
    log(
        f"Model: SmolLM2-135M (fp32) with {len(tasks)} tasks ({', '.join(tasks)}) from "
        f"`{pack.name}` (1-bit sign residuals). Requests: {args.requests}, tasks round-robin, "
        f"{len(PROMPTS)} prompts, greedy, max_tokens {args.tokens}."
    )
    log()
    print("offline reference ...", flush=True)
    expected, t_off = offline(base, pack, reqs)

    rows = []
    srv = Proc(pack, base, "--max-batch", str(args.clients), "--max-tokens", "64").wait()
    try:
        warm = reqs[:2]
        asyncio.run(load(warm, lambda r: srv.url, 1, args.timeout))
        print("one at a time ...", flush=True)
        res, wall = asyncio.run(load(reqs, lambda r: srv.url, 1, args.timeout))
        rows.append(summary("one server, one request at a time", res, wall, expected, srv.rss()))
        print(f"{args.clients} clients ...", flush=True)
        res, wall = asyncio.run(load(reqs, lambda r: srv.url, args.clients, args.timeout))
        rows.append(
            summary(
                f"one server, {args.clients} concurrent clients, mixed tasks",
                res,
                wall,
                expected,
                srv.rss(),
            )
        )
        batches = [
            x
            for x in httpx.get(srv.url + "/metrics").text.splitlines()
            if x.startswith("qmerge_batch_size")
        ]
        print("fuzz ...", flush=True)
        t0 = time.perf_counter()
        codes = fuzz(srv.url, args.fuzz)
        t_fuzz = time.perf_counter() - t0
        after, _ = asyncio.run(load(reqs[:10], lambda r: srv.url, 4, args.timeout))
        after_same = sum(r[2] == e for r, e in zip(after, expected[:10], strict=True))
        alive = httpx.get(srv.url + "/health").status_code
    finally:
        srv.stop()

    print("one server per task ...", flush=True)
    per = {
        t: Proc(
            pack, base, "--max-batch", str(args.clients), "--max-tokens", "64", "--threads", "1"
        )
        for t in tasks
    }
    try:
        for p in per.values():
            p.wait()
        res, wall = asyncio.run(
            load(reqs, lambda r: per[r["model"]].url, args.clients, args.timeout)
        )
        rss = [p.rss_mb() for p in per.values()]
        rows.append(
            summary(
                f"{len(tasks)} servers, one per task (1 thread each), {args.clients} clients",
                res,
                wall,
                expected,
                f"{sum(r[0] for r in rss):.0f} / {sum(r[1] for r in rss):.0f}",
            )
        )
    finally:
        for p in per.values():
            p.stop()

    seq, conc = rows[0], rows[1]
    log("## Throughput and latency")
    log()
    log(
        f"Offline (the patched model's `generate`, one request at a time, in-process): "
        f"{t_off:.1f} s for {len(reqs)} requests ({len(reqs) / t_off:.2f} req/s)."
    )
    log()
    log(
        "| setup | answered | wall s | req/s | tokens/s | p50 s | p99 s | = offline greedy | "
        "RSS now / peak MB |"
    )
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(
            f"| {r['name']} | {r['ok']}/{r['n']} | {r['wall']:.1f} | {r['rps']:.2f} | "
            f"{r['tps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['same']}/{r['n']} | "
            f"{r['rss']} |"
        )
    log()
    speed = conc["rps"] / seq["rps"]
    log(
        f"- **{args.clients} concurrent clients vs one at a time: {speed:.2f}x throughput** "
        f"(target ≥ 3x: {'PASS' if speed >= 3 else 'FAIL'})."
    )
    log(
        f"- **Greedy answers equal to the offline generation: {conc['same']}/{conc['n']}** "
        f"concurrent, {seq['same']}/{seq['n']} one at a time "
        f"({'PASS' if conc['same'] == conc['n'] else 'FAIL'})."
    )
    log(
        f"- One server per task: {rows[2]['rps'] / seq['rps']:.2f}x the one-at-a-time "
        f"throughput, {conc['rps'] / rows[2]['rps']:.2f}x slower than the one batched server."
    )
    log()
    log("Batch sizes the server ran (from its /metrics, both runs):")
    log()
    log("```")
    for x in batches:
        if "_count" in x or "_sum" in x:
            log(x)
    log("```")
    log()
    n5 = sum(v for (_, _, c), v in codes.items() if c >= 500)
    total = sum(codes.values())
    log("## Fuzzing the OpenAPI spec")
    log()
    log(
        f"{total} requests generated by schemathesis from /openapi.json (valid and invalid "
        f"bodies, every operation) in {t_fuzz:.0f} s: **{n5} answered 5xx** "
        f"({'PASS' if n5 == 0 and total >= 1000 else 'FAIL'}). After them, /health answered "
        f"{alive} and {after_same}/10 greedy requests still equal their offline answer."
    )
    log()
    log("| method | path | status | requests |")
    log("|---|---|---|---|")
    for (m, p, c), v in sorted(codes.items()):
        log(f"| {m} | {p} | {c} | {v} |")
    log()
    hot_swap(base, pack, fts, expected, reqs, log)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


def hot_swap(base: Path, pack: Path, fts: dict, expected: list[str], reqs: list[dict], log) -> None:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="qmerge-serve-"))
    live = tmp / "pack"
    shutil.copytree(pack, live)
    victim = "noise2"
    i = next(k for k, r in enumerate(reqs) if r["model"] == victim)
    srv = Proc(live, base, "--max-tokens", "64").wait()
    try:

        def status() -> int:
            return httpx.post(srv.url + "/v1/completions", json=reqs[i], timeout=120).status_code

        assert status() == 200
        t0 = time.monotonic()
        qmerge.remove_task(live, [victim])
        t_rm = time.monotonic() - t0
        gone = wait_for(lambda: status() == 404)
        t0 = time.monotonic()
        qmerge.add_task(live, base, {victim: fts[victim]}, opts=qmerge.Options(progress=False))
        t_add = time.monotonic() - t0
        back = wait_for(lambda: status() == 200)
        r = httpx.post(srv.url + "/v1/completions", json=reqs[i], timeout=120).json()
        same = r["choices"][0]["text"] == expected[i]
        health = httpx.get(srv.url + "/health").json()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    log("## Adding and removing a task without a restart")
    log()
    log(
        f"On a copy of the pack served by a running server: `qmerge.remove_task(pack, "
        f"['{victim}'])` took {t_rm:.1f} s; the server answered **404** for `{victim}` "
        f"{gone:.1f} s later. `qmerge.add_task` of the same fine-tune took {t_add:.1f} s "
        f"(compression); the server answered it again **{back:.1f} s** later, and its greedy "
        f"answer {'equals' if same else 'DIFFERS from'} the offline one. Tasks served at the "
        f"end: {', '.join(health['tasks'])}; reload errors: {health['reload_error']}."
    )
    log()


if __name__ == "__main__":
    main()
