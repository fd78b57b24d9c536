"""The quality benchmark: static merges vs routed compressed deltas on real fine-tunes.

    .venv/bin/python -m bench.quality.run [--seeds 0,1,2] [--max-test 200] [--lm-max-test 100]

MiniLM track (minilm.py): all-MiniLM-L6-v2 fine-tuned (whole encoder + a head) on the 5 tasks
of tasks.py, one fine-tune per task and seed (finetune.py, cached in bench/.cache). LLM track
(lm.py): SmolLM2-135M taught to answer the label word of 3 tasks (finetune_lm.py), scored by
exact match of its greedy answer, one seed. Each task's test split (a hash of the text) gives
examples at even steps to a held-out split, on which the static merges' scales are tuned
(measure.held_out); the rest, up to --max-test, is the test set.

Writes bench/results/quality.md, quality.json and quality.png; the analysis of the figures is
kept in quality-notes.md. Needs tasks.py's data (`ensure_data()` names what to install), the
base models of finetune.py and common.py, and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.quality import lm as lm_track
from bench.quality import minilm as minilm_track
from bench.quality.measure import LABELS, ROWS_VERSION, SWEEPS
from qmerge.verbs.demo import data as task_data

HERE = Path(__file__).resolve().parent

RESULTS = HERE.parent / "results"
LM_TASKS = "fortune_topic,sentiment,language"


# --- report ------------------------------------------------------------------------------


def summarize(per_seed: dict[int, list[dict]]) -> list[dict]:
    seeds = sorted(per_seed)
    out = []
    for i, row in enumerate(per_seed[seeds[0]]):
        runs = [per_seed[s][i] for s in seeds]
        acc = [r["avg_acc"] for r in runs]
        norm = [r["avg_norm"] for r in runs]
        tasks = list(row["acc"])
        out.append(
            row
            | {
                "setup": _merge_names([r["setup"] for r in runs]),
                "acc_mean": statistics.mean(acc),
                "acc_spread": max(acc) - min(acc),
                "norm_mean": statistics.mean(norm),
                "norm_spread": max(norm) - min(norm),
                "norm_by_seed": dict(zip(seeds, norm, strict=True)),
                "task_acc": {t: statistics.mean(r["acc"][t] for r in runs) for t in tasks},
                "bytes_per_task": _mean([r["bytes_per_task"] for r in runs]),
                "linear_bits": _mean([r["linear_bits"] for r in runs]),
                "all_bits": _mean([r["all_bits"] for r in runs]),
            }
        )
    return out


def _mean(xs):
    return None if any(x is None for x in xs) else statistics.mean(xs)


def _merge_names(names: list[str]) -> str:
    """A tuned static merge may pick another value per seed: 'TA (λ=0.3 / 0.5, tuned)'."""
    if len(set(names)) == 1:
        return names[0]
    cut = names[0].rindex("(")
    knob = names[0][cut + 1 :].split("=")[0]
    values = [n[n.rindex("(") + 1 :].split("=", 1)[1].split(",")[0] for n in names]
    return f"{names[0][:cut]}({knob}={' / '.join(values)}, tuned)"


_SHORT = (
    ("routed ", ""),
    ("calibrated", "cal."),
    ("prototype router", "proto"),
    ("linear router", "linear"),
    ("oracle ids", "oracle"),
    (" (cosine)", " cosine"),
    ("shared + ", "+ "),
    (" exclusive", ""),
    ("individual fine-tunes", "fine-tunes"),
)


def _short(setup: str) -> str:
    """A plot label: the setup's name, shortened but never cut (every label stays distinct)."""
    setup = setup.split(" (λ=")[0].split(" (β=")[0]
    for long, short in _SHORT:
        setup = setup.replace(long, short)
    return setup


def _b(x):
    return "—" if x is None else f"{x / 2**20:.2f}"


def _f(x, d=3):
    return "—" if x is None else f"{x:.{d}f}"


def table(rows: list[dict], score: str) -> list[str]:
    tasks = list(rows[0]["acc"])
    head = (
        "| setup | " + " | ".join(tasks) + f" | avg {score} | avg normalized | "
        "spread (norm) | MB per task | bits/param linear | bits/param all |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 7)]
    for r in rows:
        cells = [f"{r['task_acc'][t]:.3f}" for t in tasks]
        # one seed has no spread to state
        spread = f"{r['norm_spread'] * 100:.1f}" if len(r["norm_by_seed"]) > 1 else "—"
        lines.append(
            f"| {r['setup']} | " + " | ".join(cells) + f" | {r['acc_mean']:.3f} | "
            f"**{r['norm_mean'] * 100:.1f}%** | {spread} | "
            f"{_b(r['bytes_per_task'])} | {_f(r['linear_bits'])} | "
            f"{_f(r['all_bits'])} |"
        )
    return lines


def sweep_table(sweeps: dict[int, dict]) -> list[str]:
    """Held-out accuracy over each static merge's grid, per seed, and the chosen value."""
    lines = [
        "| method | knob | paper's value | held-out average accuracy per value (seed: chosen) |",
        "|---|---|---|---|",
    ]
    seeds = sorted(sweeps)
    for method in sweeps[seeds[0]]:
        first = sweeps[seeds[0]][method]
        curves = "; ".join(
            f"seed {s}: "
            + ", ".join(f"{v}: {a:.3f}" for v, a in sweeps[s][method]["curve"].items())
            + f" (**{_chosen(sweeps[s][method])}**)"
            for s in seeds
        )
        lines.append(f"| {LABELS[method]} | {first['knob']} | {first['paper']:g} | {curves} |")
    return lines


def _chosen(sweep: dict) -> str:
    """The chosen value, flagged when it lies on an end of the grid (the best may lie beyond)."""
    grid = [float(v) for v in sweep["curve"]]
    edge = sweep["best"] in (grid[0], grid[-1])
    return f"{sweep['best']:g}" + (", an end of the grid" if edge else "")


def targets(rows: list[dict]) -> list[str]:
    """Issue 5's targets, read off the MiniLM rows."""
    by = {r["setup"]: r for r in rows}
    oracle = by["routed sign calibrated, oracle ids"]
    proto = by["routed sign calibrated, prototype router"]
    statics = [r for r in rows if r["group"] == "static merge"]
    best_static = max(statics, key=lambda r: r["acc_mean"])
    best_se = max(
        (r for r in rows if r["group"] == "shared+exclusive"), key=lambda r: r["acc_mean"]
    )
    gap = (best_se["acc_mean"] - best_static["acc_mean"]) * 100

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    worst = min(oracle["norm_by_seed"].values())
    return [
        "| target (MiniLM track) | measured | |",
        "|---|---|---|",
        f"| routed 1-bit, oracle ids: ≥ 99% normalized at ≤ 1.1 bits/param (linear) | "
        f"{oracle['norm_mean'] * 100:.1f}% (lowest seed {worst * 100:.1f}%) at "
        f"{oracle['linear_bits']:.3f} bits/param | "
        f"{verdict(oracle['norm_mean'] >= 0.99 and oracle['linear_bits'] <= 1.1)} |",
        f"| prototype router instead of oracle ids: ≥ 97% normalized | "
        f"{proto['norm_mean'] * 100:.1f}% (lowest seed "
        f"{min(proto['norm_by_seed'].values()) * 100:.1f}%) | "
        f"{verdict(proto['norm_mean'] >= 0.97)} |",
        f"| best shared+exclusive beats every static merge by ≥ 10 points of average accuracy | "
        f"{best_se['setup']} {best_se['acc_mean']:.3f} vs {best_static['setup']} "
        f"{best_static['acc_mean']:.3f}: +{gap:.1f} points | {verdict(gap >= 10)} |",
    ]


def plot(tracks: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tracks), figsize=(8 * len(tracks), 5.5), squeeze=False)
    colors = {
        "reference": "k",
        "static merge": "tab:red",
        "shared+exclusive": "tab:green",
        "routed": "tab:blue",
    }
    for ax, (title, rows) in zip(axes[0], tracks, strict=True):
        for r in rows:
            x = r["bytes_per_task"] / 2**20 if r["bytes_per_task"] else 0.05
            ax.scatter(x, r["norm_mean"] * 100, c=colors[r["group"]], label=r["group"])
            ax.annotate(
                _short(r["setup"]),
                (x, r["norm_mean"] * 100),
                fontsize=5.5,
                xytext=(3, 2),
                textcoords="offset points",
            )
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=False))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel("stored MB per task (merged packs: shared delta divided among the tasks)")
        ax.set_ylabel("normalized accuracy, % of the individual fine-tunes")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(
    out: Path,
    command: str,
    meta: str,
    minilm: tuple[list[dict], dict[int, dict]],
    lm: tuple[list[dict], dict[int, dict]] | None,
) -> None:
    rows, sweeps = minilm
    png = out.with_suffix(".png")
    tracks = [("MiniLM-L6 (classification heads)", rows)]
    if lm:
        tracks.append(("SmolLM2-135M (exact-match answers)", lm[0]))
    plot(tracks, png)
    how = (
        "Per-task {score} is the mean over seeds; *normalized* is {score} ÷ the individual "
        "fine-tune's, per task, averaged over tasks, then over seeds; *spread* is max − min "
        "of it over seeds (points). Bytes and bits/param are per task (a merged pack's "
        "shared delta is divided among the tasks); *linear* counts the attention/MLP "
        "matrices only. Static merges are scored as stored packs, at the value their sweep "
        "chose on the held-out split (table below)."
    )
    text = [
        "# Quality: static merges vs routed compressed deltas",
        "",
        f"Command: `{command}`",
        "",
        meta,
        "",
        "Analysis, and why each figure is what it is: [quality-notes.md](quality-notes.md).",
        "",
        "## Targets",
        "",
        *targets(rows),
        "",
        "## MiniLM track (all-MiniLM-L6-v2, whole-encoder fine-tunes + per-task heads)",
        "",
        how.format(score="accuracy"),
        "",
        *table(rows, "acc"),
        "",
        "Static-merge sweeps (held-out split, average accuracy over tasks):",
        "",
        *sweep_table(sweeps),
        "",
    ]
    if lm:
        text += [
            "## LLM track (SmolLM2-135M answering each task's label word)",
            "",
            how.format(score="exact match"),
            "",
            *table(lm[0], "exact"),
            "",
            "Static-merge sweeps (held-out split, average exact match):",
            "",
            *sweep_table(lm[1]),
            "",
        ]
    text += [f"![normalized accuracy vs bytes per task]({png.name})", ""]
    from qmerge.format.atomic import atomic_file

    with atomic_file(out) as f:
        f.write("\n".join(text).encode())
    with atomic_file(out.with_suffix(".json")) as f:
        f.write(
            json.dumps(
                {
                    "minilm": rows,
                    "minilm_sweeps": sweeps,
                    "lm": lm[0] if lm else None,
                    "lm_sweeps": lm[1] if lm else None,
                },
                indent=1,
            ).encode()
        )


# --- running -----------------------------------------------------------------------------


def run_seeds(make, seeds: list[int], cache: Path | None, log) -> tuple[list[dict], dict]:
    """Every seed of one track (`make(seed)` -> (track, setups)); a seed's rows are taken
    from `cache/<seed>.json` when given and present."""
    per_seed, sweeps = {}, {}
    for seed in seeds:
        cached = cache / f"{seed}.json" if cache else None
        if cached and cached.is_file():
            log(f"seed {seed}: rows from {cached}")
            per_seed[seed], sweeps[seed] = json.loads(cached.read_text())
            continue
        log(f"seed {seed}")
        track, setups = make(seed)
        per_seed[seed], sweeps[seed] = setups(track, log)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps([per_seed[seed], sweeps[seed]]))
    return summarize(per_seed), sweeps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="0,1,2", help="MiniLM fine-tuning seeds")
    ap.add_argument("--max-test", type=int, default=200, help="MiniLM test examples per task")
    ap.add_argument("--steps", type=int, default=200, help="MiniLM fine-tuning steps")
    ap.add_argument("--tasks", default=",".join(task_data.ALL), help="MiniLM tasks")
    ap.add_argument("--lm-tasks", default=LM_TASKS, help="LLM tasks ('' skips the track)")
    ap.add_argument("--lm-max-test", type=int, default=100, help="LLM test examples per task")
    ap.add_argument(
        "--lm-steps",
        type=int,
        default=60,
        help="LLM answer fine-tuning steps for tasks not cached yet",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.md")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="take a seed's rows from the cache "
        "(bench/.cache/quality) when the same settings made them",
    )
    a = ap.parse_args(argv)
    from bench.common import CACHE, smollm2_base
    from bench.quality.finetune import finetune, minilm_base
    from bench.quality.finetune_lm import finetune_answers

    task_data.ensure_data()
    torch.set_num_threads(2)
    seeds = [int(x) for x in a.seeds.split(",")]
    names = a.tasks.split(",")
    lm_names = [n for n in a.lm_tasks.split(",") if n]
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    data = {n: task_data.load(n) for n in {*names, *lm_names}}
    work = CACHE / "quality"
    # cached rows follow the grids and the way rows are made
    grids = hashlib.sha256(repr((SWEEPS, ROWS_VERSION)).encode()).hexdigest()[:8]
    tag = f"n{a.max_test}-s{a.steps}-{'+'.join(names)}-g{grids}"

    def make_minilm(seed):
        fts = {n: finetune(n, a.steps, seed=seed) for n in names}
        return minilm_track.MiniLM(
            minilm_base(), fts, data, work / f"minilm-s{seed}", seed, a.max_test
        ), minilm_track.setups

    log("MiniLM track")
    minilm = run_seeds(make_minilm, seeds, work / f"rows-minilm-{tag}" if a.reuse else None, log)
    lm = None
    if lm_names:

        def make_lm(seed):
            fts = {n: finetune_answers(n, a.lm_steps) for n in lm_names}
            return lm_track.LM(
                smollm2_base(), fts, data, work / "lm-s0", seed, a.lm_max_test
            ), lm_track.setups

        log("LLM track")
        lm_tag = f"n{a.lm_max_test}-{'+'.join(lm_names)}-g{grids}"
        lm = run_seeds(make_lm, [0], work / f"rows-lm-{lm_tag}" if a.reuse else None, log)
    command = ".venv/bin/python -m bench.quality.run " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    lm_steps = ", ".join(f"{n} {_steps(CACHE / f'smollm2-{n}-answers')}" for n in lm_names)
    meta = (
        f"- date {time.strftime('%Y-%m-%d')}; torch {torch.__version__}; MiniLM: seeds "
        f"{seeds}, {a.max_test} test examples per task at most, {a.steps} fine-tuning "
        f"steps (batch 16); LLM: 1 seed, {a.lm_max_test} test examples per task at most, "
        f"fine-tuning steps (batch 8) {lm_steps or 'skipped'}; {time.time() - t0:.0f} s "
        f"(seeds taken from the cache are not timed again)"
    )
    write_report(a.out, command.rstrip(), meta, minilm, lm)
    log(f"wrote {a.out}")


def _steps(finetune: Path) -> str:
    meta = finetune / "qmerge-task.json"
    return str(json.loads(meta.read_text()).get("steps", "?")) if meta.is_file() else "?"


if __name__ == "__main__":
    main()
