"""What `qmerge demo` prints, and its plot (accuracy against megabytes per task)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SETUPS = {
    "finetune": "fine-tunes (fp32, one model per task)",
    "pack_task": "1-bit pack, each row routed by its task",
    "pack_router": "1-bit pack, each row routed by the router",
    "static_merge": "static merge (TIES), one model for all",
}
SIZE_OF = {
    "finetune": "finetune",
    "pack_task": "pack",
    "pack_router": "pack",
    "static_merge": "static_merge",
}


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / max(len(d), 1)


def summary(r: dict) -> dict:
    """Per setup: average accuracy, the share of the fine-tunes' (per task, averaged), MB per
    task."""
    ft = r["accuracy"]["finetune"]
    out = {}
    for key, acc in r["accuracy"].items():
        rel = mean({t: acc[t] / ft[t] for t in acc if ft[t] > 0})
        out[key] = {
            "accuracy": mean(acc),
            "of_finetunes": rel,
            "mb_per_task": r["mb_per_task"][SIZE_OF[key]],
        }
    return out


def lines(r: dict) -> list[str]:
    """The report as text lines."""
    tasks = r["tasks"]
    s = summary(r)
    width = max(len(v) for v in SETUPS.values())
    head = f"{'':{width}}  " + "  ".join(f"{t[:12]:>12}" for t in tasks)
    out = [
        "",
        f"accuracy on {sum(r['test_texts'].values())} held-out test texts",
        head + f"  {'average':>8}  {'of FT':>6}  {'MB/task':>8}",
    ]
    for key, label in SETUPS.items():
        acc = r["accuracy"][key]
        cells = "  ".join(f"{acc[t]:>12.3f}" for t in tasks)
        out.append(
            f"{label:{width}}  {cells}  {s[key]['accuracy']:>8.3f}  "
            f"{s[key]['of_finetunes']:>6.1%}  {s[key]['mb_per_task']:>8.2f}"
        )
    ft_mb, pk_mb = r["mb_per_task"]["finetune"], r["mb_per_task"]["pack"]
    out += [
        "",
        f"router: {r['router_accuracy']:.1%} of test texts sent to their own task",
        f"pack: {pk_mb:.2f} MB per task against {ft_mb:.2f} MB per fine-tune "
        f"({ft_mb / pk_mb:.0f}x smaller); verified: {r['verify']['files_checked']} files, "
        f"base {r['verify']['base']}",
    ]
    e = r["export"]
    out.append(
        f"export: task {e['task']!r} as {e['format']}, {e['mb']:.1f} MB, "
        f"{e['agreement']:.1%} top-1 agreement with the pack over {e['compared']} texts "
        f"({'passed' if e['passed'] else 'FAILED'}) -> {e['dir']}"
    )
    out += ["", "one mixed batch (a task named, or 'auto': the router picks):"]
    for b in r["batch"]:
        text = b["text"] if len(b["text"]) <= 44 else b["text"][:41] + "..."
        mark = "ok" if b["routed"] == b["task"] and b["label"] == b["truth"] else "x"
        out.append(f"  {b['asked']:>10} -> {b['routed']:<10} {b['label']:<18} {mark:<2} {text!r}")
    secs = r["seconds"]
    out += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items())]
    if r.get("plot"):
        out.append(f"plot: {r['plot']}")
    return out


def plot(r: dict, path: Path) -> Path | None:
    """Accuracy against MB per task, one point per setup (log x); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = summary(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in SETUPS.items():
        ax.scatter(s[key]["mb_per_task"], s[key]["accuracy"], s=60, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("MB per task (log)")
    ax.set_ylabel(f"average accuracy over {len(r['tasks'])} tasks")
    ax.set_title("qmerge demo: all-MiniLM-L6-v2, " + ", ".join(r["tasks"]), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def show(r: dict, log: Callable[[str], None] = print) -> None:
    for line in lines(r):
        log(line)
