"""`qmerge serve --ray` (Ray Serve) against plain `qmerge serve` on SmolLM2-135M with 5 tasks
(bench/serve.py's pack and requests), on loopback. Writes bench/results/serve-ray.md.

    .venv/bin/python -m bench.serve_ray [--requests 120] [--clients 32] [--tokens 32]

All in one run, one server at a time on the same 2 cores:
1. the offline answer of every request (the patched model's own greedy `generate`);
2. plain `qmerge serve` (2 threads), then Ray Serve with one replica of 2 threads (Ray's
   overhead, as a ratio), then two replicas of one thread each: 32 concurrent clients, tasks
   mixed, every answer compared with its offline answer;
3. the replica-kill trial on the two-replica application: one replica is SIGKILLed under load;
   the answers during the kill are counted by status (none may hang: every request has a
   timeout), then every request sent after the restart must succeed with its offline answer;
4. a capacity model for a cluster, from the figures measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import qmerge
from bench._server import free_port, load, status_kb
from bench.common import CACHE, QMERGE, minilm_base, results_log, smollm2_base
from bench.serve import PROMPTS, offline, requests, summary

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "serve-ray.md"


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


class Server:
    """A `qmerge serve` process (plain, or `--ray`) on a free loopback port; its log in a file."""

    def __init__(self, pack: Path, base: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [*QMERGE, "serve", str(pack), "--base", str(base), "--port", str(self.port)]
        self.p = subprocess.Popen(
            [*cmd, "--log-level", "warning", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, replicas: int = 0, timeout: float = 300) -> Server:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200 and len(r.json().get("replicas", [])) >= replicas:
                    return self
            except httpx.TransportError:
                pass
            if self.p.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError("server did not start")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_mb(self) -> float:
        return sum(status_kb(p, "VmRSS") for p in descendants(self.p.pid)) / 1024

    def stop(self) -> None:
        os.killpg(self.p.pid, signal.SIGINT)
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def replica_rss(srv: Server) -> list[float]:
    return [status_kb(r["pid"], "VmRSS") / 1024 for r in srv.health()["replicas"]]


def run_load(srv: Server, reqs, clients, timeout, expected, name) -> dict:
    asyncio.run(load(reqs[:2], lambda r: srv.url, 2, timeout))  # warm-up
    res, wall = asyncio.run(load(reqs, lambda r: srv.url, clients, timeout))
    if "--ray" in srv.p.args:  # the replicas' own RSS
        rss = "replicas " + " + ".join(f"{x:.0f}" for x in replica_rss(srv))
    else:
        rss = f"{srv.rss_mb():.0f}"
    return summary(name, res, wall, expected, rss)


def kill_trial(srv: Server, reqs, clients, timeout, expected, log) -> None:
    """SIGKILL one replica 3 s into a load; count statuses; after its restart, all must pass."""
    import httpx

    before = {r["replica"]: r["pid"] for r in srv.health()["replicas"]}
    victim = next(iter(before.values()))
    out: dict = {}

    async def under_load():
        task = asyncio.ensure_future(load(reqs, lambda r: srv.url, clients, timeout))
        await asyncio.sleep(3)
        os.kill(victim, signal.SIGKILL)
        out["killed"] = time.monotonic()
        return await task

    try:
        res, wall = asyncio.run(under_load())
    except httpx.TimeoutException:
        log("- **a request hung past its timeout during the kill (FAIL)**")
        return
    t0 = out["killed"]
    while True:
        reps = srv.health()["replicas"]
        if len(reps) == 2 and {r["replica"] for r in reps} != set(before):
            break
        if time.monotonic() - t0 > 300:
            log("- **the killed replica was not restarted within 300 s (FAIL)**")
            return
        time.sleep(0.5)
    restart = time.monotonic() - t0
    after, _ = asyncio.run(load(reqs, lambda r: srv.url, clients, timeout))
    codes: dict[int, int] = {}
    for r in res:
        codes[r[0]] = codes.get(r[0], 0) + 1
    ok_after = sum(r[0] == 200 for r in after)
    same_after = sum(r[2] == e for r, e in zip(after, expected, strict=True))
    same_during = sum(r[0] == 200 and r[2] == e for r, e in zip(res, expected, strict=True))
    metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    retried = [x for x in metrics.splitlines() if x.startswith("qmerge_ray_")]
    log("## A replica killed under load")
    log()
    log(
        f"Two replicas, {clients} clients, {len(reqs)} requests; one replica (pid {victim}) "
        f"SIGKILLed 3 s into the load."
    )
    log()
    log(
        f"- during the kill: statuses {dict(sorted(codes.items()))} in {wall:.1f} s; every "
        f"request ended (none reached the load generator's {timeout:g} s timeout); "
        f"{same_during} answers equal their offline answer."
    )
    log(f"- the ingress's counters: {', '.join(retried)}.")
    log(f"- the replica was back (a new replica id reporting) {restart:.1f} s after the kill.")
    log(
        f"- **after the restart: {ok_after}/{len(after)} succeeded, {same_after}/{len(after)} "
        f"equal their offline answer ({'PASS' if same_after == len(after) else 'FAIL'}).**"
    )
    log()


def two_packs(srv: Server, cpack: Path, cbase: Path, log) -> None:
    """The second pack of the application (MiniLM classifiers, another base): /v1/classify
    through Ray against `qmerge run` in this process."""
    import httpx

    from qmerge.verbs import run as inference

    tasks = list(qmerge.open_pack(cpack).tasks)
    texts = list(PROMPTS[:8])
    got = []
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for t in tasks:
            r = c.post("/v1/classify", json={"model": f"minilm/{t}", "input": texts})
            got += r.json()["data"] if r.status_code == 200 else [None] * len(texts)
        lm = c.post("/v1/completions", json={"model": "fortunes", "prompt": "The moon is"})
    ref = inference.run(cpack, cbase, [{"text": x, "task": t} for t in tasks for x in texts])
    same = sum(
        g is not None
        and g["label"] == x["label"]
        and max(abs(g["scores"][k] - v) for k, v in x["scores"].items()) <= 1e-5
        for g, x in zip(got, ref["results"], strict=True)
    )
    log("## Two packs, two bases, one application")
    log()
    log(
        f"The two-replica application also served `{cpack.name}` (all-MiniLM-L6-v2 "
        f"classifiers, {len(tasks)} tasks with heads) as `--pack minilm=...`: "
        f"**{same}/{len(got)} classifications through Ray equal `qmerge run`** (label, and "
        f"every class probability within 1e-5; {'PASS' if same == len(got) else 'FAIL'}); "
        f"a completion on the SmolLM2 pack in between answered {lm.status_code}."
    )
    log()


def capacity(log, pack: Path, base: Path, one: dict, rss_one: float, tokens: int) -> None:
    tasks = list(qmerge.open_pack(pack).tasks)
    pack_mb = sum(f.stat().st_size for f in pack.rglob("*") if f.is_file()) / 2**20
    base_mb = sum(f.stat().st_size for f in base.rglob("*.safetensors")) / 2**20
    per_task = pack_mb / len(tasks)
    rest = rss_one - base_mb - pack_mb
    log("## Capacity model for a cluster (from this run's figures)")
    log()
    log(f"- base weights {base_mb:.0f} MB; pack {pack_mb:.1f} MB for {len(tasks)} tasks:")
    log(f"  **{per_task:.1f} MB per task** (1-bit signs, {per_task / base_mb:.1%} of the base).")
    log(
        f"- one replica measured {rss_one:.0f} MB RSS: base + pack + {rest:.0f} MB of runtime "
        f"(torch, tokenizer, KV cache of a 32-sequence batch)."
    )
    log(
        f"  Replica memory ≈ {base_mb + rest:.0f} MB + tasks × {per_task:.1f} MB: 100 tasks "
        f"≈ {base_mb + rest + 100 * per_task:.0f} MB, 1000 tasks ≈ "
        f"{base_mb + rest + 1000 * per_task:.0f} MB."
    )
    rps, tps = one["rps"], one["tps"]
    log(
        f"- one replica of 2 cores answered {rps:.2f} req/s ({tps:.0f} tokens/s) of {tokens}-token "
        f"completions over {len(tasks)} mixed tasks. More tasks in a batch cost more per "
        f"decoding step (each task present adds a pass over the base in `sign_linear`: "
        f"bench/results/serve-notes.md), so size with the task mix expected."
    )
    log(f"- replicas for a load of L req/s: ⌈L / {rps:.2f}⌉ (2 cores each), e.g.")
    for load_rps in (10, 50, 200):
        n = math.ceil(load_rps / rps)
        log(f"  - {load_rps} req/s: {n} replicas, {2 * n} cores")
    log()


def pooled_tps(rs: list[dict]) -> float:
    return sum(r["tps"] * r["wall"] for r in rs) / sum(r["wall"] for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    base, pack = smollm2_base(), CACHE / "pack-smollm2-5"
    if not pack.exists():
        raise SystemExit(f"{pack} is missing: run `python -m bench.serve` once to build it")
    from bench.routing import minilm_pack

    cpack, cbase = minilm_pack()[0], minilm_base()
    tasks = list(qmerge.open_pack(pack).tasks)
    reqs = requests(tasks, args.requests, args.tokens)
    cmd = (
        f"`.venv/bin/python -m bench.serve_ray --requests {args.requests} --clients "
        f"{args.clients} --tokens {args.tokens}`"
    )
    lines, log = results_log(
        "qmerge serve on Ray Serve", cmd, f"qmerge kernels {qmerge.ops.backend()['cpu']}"
    )
    log()
    log(
        f"SmolLM2-135M (fp32), {len(tasks)} tasks ({', '.join(tasks)}) in `{pack.name}`; "
        f"{args.requests} greedy requests of {args.tokens} tokens, tasks round-robin, "
        f"{args.clients} concurrent clients. Servers and load generator share the 2 cores; "
        f"one server at a time."
    )
    log()
    print("offline reference ...", flush=True)
    expected, t_off = offline(base, pack, reqs)
    common = ["--max-batch", str(args.clients), "--max-tokens", "64"]
    plain = ("plain `qmerge serve`, 2 threads", [], 0)
    one = ("Ray Serve, 1 replica of 2 threads", ["--ray", "--replicas", "1", "--threads", "2"], 1)
    two = (
        "Ray Serve, 2 replicas of 1 thread",
        ["--ray", "--replicas", "2", "--threads", "1", "--pack", f"minilm={cpack},{cbase}"],
        2,
    )
    # plain and one replica twice, alternating: this machine's speed drifts by up to 1.5x
    # over minutes, so the ratio pools two rounds of each
    rows = []
    rss_one = 0.0
    kill_log: list[str] = []  # logged after the throughput table
    for k, (name, extra, replicas) in enumerate([plain, one, plain, one, two]):
        label = f"{name}, round {k // 2 + 1}" if k < 4 else name
        print(label, "...", flush=True)
        srv = Server(pack, base, *common, *extra).wait(replicas)
        try:
            rows.append(run_load(srv, reqs, args.clients, args.timeout, expected, label))
            rows[-1]["tree"] = srv.rss_mb()
            if replicas == 1:
                rss_one = replica_rss(srv)[0]
            if replicas == 2:
                two_packs(srv, cpack, cbase, lambda s="": kill_log.append(s))
                kill_trial(
                    srv, reqs, args.clients, args.timeout, expected, lambda s="": kill_log.append(s)
                )
        finally:
            srv.stop()
    log("## Throughput")
    log()
    log(f"Offline reference: {t_off:.1f} s for {len(reqs)} requests, one at a time.")
    log()
    log(
        "| setup | answered | wall s | req/s | tokens/s | p50 s | p99 s | = offline greedy | "
        "serving RSS MB | all processes MB |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(
            f"| {r['name']} | {r['ok']}/{r['n']} | {r['wall']:.1f} | {r['rps']:.2f} | "
            f"{r['tps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['same']}/{r['n']} | "
            f"{r['rss']} | {r['tree']:.0f} |"
        )
    log()

    def pooled(rs: list[dict]) -> float:
        return sum(r["ok"] for r in rs) / sum(r["wall"] for r in rs)

    p_rps, o_rps = pooled(rows[0:4:2]), pooled(rows[1:4:2])
    ratio = o_rps / p_rps
    rounds = ", ".join(f"{rows[i + 1]['rps'] / rows[i]['rps']:.2f}x" for i in (0, 2))
    log(
        f"- **One Ray replica: {ratio:.2f}x the throughput of plain `qmerge serve`** over both "
        f"rounds ({o_rps:.2f} vs {p_rps:.2f} req/s; round by round {rounds}; target ≥ 0.8x: "
        f"{'PASS' if ratio >= 0.8 else 'FAIL'})."
    )
    log(f"- Two replicas of one thread: {rows[4]['rps'] / p_rps:.2f}x plain.")
    all_same = all(r["same"] == r["n"] for r in rows)
    log(
        f"- **Greedy answers equal to offline: "
        f"{', '.join(str(r['same']) + '/' + str(r['n']) for r in rows)}** "
        f"({'PASS' if all_same else 'FAIL'})."
    )
    log()
    for s in kill_log:
        log(s)
    capacity(log, pack, base, {"rps": o_rps, "tps": pooled_tps(rows[1:4:2])}, rss_one, args.tokens)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
