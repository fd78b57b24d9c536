"""The serve benchmark's decoding step and 32-client throughput, this tree against an earlier
commit, in one run (issue 29: the throughput must rise by at least the step's factor). Writes
bench/results/serve-ab.md.

    .venv/bin/python -m bench.serve_ab [--before 42d72ac] [--rounds 3]

`--before` (default: the last commit before issue 29) is checked out once as a git worktree
under bench/.cache/ and its extension built there with this environment's Python (a few
minutes, the first time). Both trees read this tree's model cache: SmolLM2-135M fp32 and
`pack-smollm2-5`, as in bench/serve.py.

Each round, in turns (the order flips every round: this VM's speed drifts by minutes):
  - the step: each tree in a process of its own times one decoding step of 32 sequences over
    5 tasks against the bare base model's step, paired call for call (bench/serve_step.py's
    measure, 3 x 15 pairs, the median ratio);
  - the throughput: each tree's `qmerge serve` on a fresh port answers bench/serve.py's
    32-client load (120 requests, 32 tokens, greedy), after two warm-up requests.
The factors compare the trees' medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench._server import Proc, load
from bench.common import CACHE, ROOT, results_log, smollm2_base
from bench.serve import OUT as SERVE_OUT
from bench.serve import requests

OUT = SERVE_OUT.with_name("serve-ab.md")
PACK = CACHE / "pack-smollm2-5"
BEFORE = "42d72ac"  # merge --config --as-pack: the last commit before issue 29


def tree_of(commit: str) -> Path:
    """A built checkout of `commit` (a git worktree under the cache), made once."""
    repo = ROOT.parent
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short=12", commit],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tree = CACHE / f"tree-{sha}"
    if not (tree / "setup.py").exists():
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=True)
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), sha], check=True
        )
    if not list((tree / "qmerge").glob("_C*.so")):
        print(f"building the extension of {sha} in {tree} (a few minutes, once)", flush=True)
        subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            cwd=tree,
            env=dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1)),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return tree


def step_child() -> None:
    """Runs in a child whose `qmerge` is the tree's: prints the step's times as JSON."""
    import qmerge
    from bench._timing import paired
    from bench.serve_step import step_pair

    steps = step_pair()
    runs = [paired(steps["base"], steps["qmerge"], 15) for _ in range(3)]
    b, q, r = (statistics.median(x[k] for x in runs) for k in range(3))
    print(json.dumps({"qmerge": qmerge.__file__, "base_ms": b * 1e3, "ms": q * 1e3, "ratio": r}))


def step(tree: Path) -> dict:
    # the tree's qmerge first, then this tree's bench (the earlier commit may lack the measure)
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); import qmerge; "
        f"sys.path.insert(0, {str(ROOT.parent)!r}); "
        f"from bench.serve_ab import step_child; step_child()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, check=True, capture_output=True, text=True
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    if not got["qmerge"].startswith(str(tree)):
        raise RuntimeError(f"the step ran {got['qmerge']}, not {tree}'s qmerge")
    return got


def throughput(tree: Path, reqs: list[dict]) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    args = ("--max-batch", "32", "--max-tokens", "64")
    p = Proc(PACK, smollm2_base(), *args, cwd=tree, env=env).wait()
    try:
        asyncio.run(load(reqs[:2], lambda r: p.url, 1, 600))
        out, wall = asyncio.run(load(reqs, lambda r: p.url, 32, 600))
    finally:
        p.stop()
    bad = [r for r in out if r[0] != 200]
    if bad:
        raise RuntimeError(f"{tree}: {len(bad)} of {len(out)} requests failed: {bad[0]}")
    return len(out) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE, help="the commit to compare (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not (PACK / "manifest.json").exists():
        raise SystemExit(f"{PACK} is missing: run `python -m bench.serve` once to build it")
    import qmerge

    trees = {"before": tree_of(args.before), "now": ROOT.parent}
    reqs = requests(list(qmerge.open_pack(PACK).tasks), 120, 32)
    cmd = f"`.venv/bin/python -m bench.serve_ab --before {args.before} --rounds {args.rounds}`"
    lines, log = results_log(
        "The serve step and 32-client throughput, before issue 29 and now",
        cmd,
        f"before = {args.before} ({trees['before'].name}), now = this tree",
    )
    log()
    log("| round | tree | base step ms | qmerge step ms | step / base | 32 clients req/s |")
    log("|---|---|---|---|---|---|")
    got: dict[str, dict[str, list[float]]] = {k: {"ratio": [], "rps": []} for k in trees}
    for r in range(args.rounds):
        order = ["before", "now"] if r % 2 == 0 else ["now", "before"]
        for name in order:
            s = step(trees[name])
            rps = throughput(trees[name], reqs)
            got[name]["ratio"].append(s["ratio"])
            got[name]["rps"].append(rps)
            log(
                f"| {r + 1} | {name} | {s['base_ms']:.1f} | {s['ms']:.1f} | "
                f"{s['ratio']:.2f}x | {rps:.2f} |"
            )
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in got.items()}
    step_f = med["before"]["ratio"] / med["now"]["ratio"]
    rps_f = med["now"]["rps"] / med["before"]["rps"]
    ok = "PASS" if rps_f >= step_f else "FAIL"
    log()
    log(
        f"- **Step:** {med['before']['ratio']:.2f}x -> {med['now']['ratio']:.2f}x the base "
        f"model's step (medians): a factor of **{step_f:.2f}**."
    )
    log(
        f"- **32-client throughput:** {med['before']['rps']:.2f} -> {med['now']['rps']:.2f} "
        f"req/s (medians): **{rps_f:.2f}x** (target: at least the step's factor, "
        f"{step_f:.2f}: {ok})."
    )
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
