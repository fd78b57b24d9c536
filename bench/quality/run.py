"""The quality benchmark: static merges vs routed compressed deltas on real fine-tunes.

    .venv/bin/python bench/quality/run.py [--seeds 0,1,2] [--max-test 500] [--lm-tasks ...]

MiniLM track: all-MiniLM-L6-v2 fine-tuned (whole encoder + a head) on the 5 tasks of tasks.py,
one fine-tune per task and seed (finetune.py, cached in bench/.cache). Heads are per task and
kept out of every merge: every setup is scored with the task's own head on the pooled output
of the encoder that setup gives. LLM track: SmolLM2-135M taught to answer each task's label
word (finetune_lm.finetune_answers), scored by exact match of its greedy answer.

Writes bench/results/quality.md, quality.json and quality.png. Needs the extras of tasks.py's
`ensure_data()` and matplotlib (`.venv/bin/pip install matplotlib`) for the plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import tasks as task_data  # noqa: E402
from common import CACHE  # noqa: E402
from finetune import finetune, minilm_base  # noqa: E402

import qmerge  # noqa: E402
from qmerge.codecs.policy import Policy  # noqa: E402

RESULTS = HERE.parent / "results"
MATRIX_TYPES = ("attention", "mlp", "other")


# --- measuring ---------------------------------------------------------------------------


def linear_bits(pack: Path) -> tuple[float, float, float]:
    """(bytes per task incl. heads, bits/param of the compressed linear weights, bits/param
    of all the task's residuals), averaged over tasks; a merged pack's shared delta is
    divided among its tasks."""
    p = qmerge.open_pack(pack)
    shared = p.shared_entries()
    lb = lp = ab = ap = fb = 0
    for t in p.tasks:
        for e in p.entries(t).values():
            ap += e["params"]
            ab += e["bytes"]
            if len(e["shape"]) == 2 and e["module_type"] in MATRIX_TYPES:
                lp += e["params"]
                lb += e["bytes"]
        fb += p.manifest["files"][f"tasks/{t}.safetensors"]["bytes"]
    n = len(p.tasks)
    for e in shared.values():
        ab += e["bytes"]
        if len(e["shape"]) == 2 and e["module_type"] in MATRIX_TYPES:
            lb += e["bytes"]
    fb += p.manifest["files"].get("shared.safetensors", {"bytes": 0})["bytes"]
    params = sum(_numel(x["shape"]) for x in p.base_fingerprint["tensors"].values())
    lin = sum(_numel(x["shape"]) for k, x in p.base_fingerprint["tensors"].items()
              if len(x["shape"]) == 2 and qmerge.codecs.module_type(k) in MATRIX_TYPES)
    return fb / n, lb * 8 / (lin * n) if lin else 0.0, ab * 8 / (params * n)


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


class MiniLM:
    """One seed of the MiniLM track: fine-tunes, test sets, and scoring of a setup."""

    def __init__(self, seed: int, max_test: int, steps: int, names: list[str]):
        from transformers import AutoTokenizer

        self.seed, self.names = seed, names
        self.base = minilm_base()
        self.tok = AutoTokenizer.from_pretrained(self.base)
        self.fts = {n: finetune(n, steps, seed=seed) for n in names}
        self.tasks = {n: task_data.load(n) for n in names}
        self.test = {n: self.tasks[n].test[:max_test] for n in names}
        self.work = CACHE / "quality" / f"minilm-s{seed}"
        self.work.mkdir(parents=True, exist_ok=True)

    def enc(self, texts):
        return self.tok(texts, padding=True, truncation=True, max_length=64,
                        return_tensors="pt")

    def batches(self, task: str, bs: int = 64):
        data = self.test[task]
        for i in range(0, len(data), bs):
            chunk = data[i:i + bs]
            yield self.enc([t for t, _ in chunk]), torch.tensor([y for _, y in chunk])

    def score_model(self, model_for: Callable[[str], torch.nn.Module]) -> dict[str, float]:
        """Accuracy per task of plain transformers classifiers (fine-tunes, floor)."""
        out = {}
        for t in self.names:
            m = model_for(t)
            right = n = 0
            with torch.no_grad():
                for enc, y in self.batches(t):
                    right += int((m(**enc).logits.argmax(-1) == y).sum())
                    n += len(y)
            out[t] = right / n
        return out

    def finetuned(self, t: str):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.fts[t]).eval()

    def floor(self, t: str):
        m = self.finetuned(t)
        from transformers import AutoModel

        m.bert.load_state_dict(AutoModel.from_pretrained(self.base).state_dict())
        return m

    def compress(self, name: str, policy: Policy, calib: bool = False) -> Path:
        out = self.work / name
        if not (out / "manifest.json").is_file():
            opts = qmerge.Options(policy=policy, heads=("classifier.*",), progress=False)
            for t in self.names:
                if calib:
                    opts.calib = self.calibration(t)
                qmerge.add_task(out, self.base, {t: self.fts[t]}, opts=opts) if \
                    (out / "manifest.json").is_file() else \
                    qmerge.compress(self.base, {t: self.fts[t]}, out, opts=opts)
        return out

    def calibration(self, t: str, n: int = 64) -> dict[str, torch.Tensor]:
        """Inputs of every Linear of the fine-tune on n training texts, keyed by base name."""
        m = self.finetuned(t)
        texts = [x for x, _ in self.tasks[t].train[:n]]
        enc = self.enc(texts)
        keep = enc["attention_mask"].reshape(-1).bool()
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        for name, mod in m.bert.named_modules():
            if isinstance(mod, torch.nn.Linear):
                def hook(_m, args, _out, name=name):
                    x = args[0]
                    x = x.reshape(-1, x.shape[-1])
                    seen[f"{name}.weight"] = x[keep] if x.shape[0] == keep.shape[0] else x
                hooks.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            m(**enc)
        for h in hooks:
            h.remove()
        return seen

    def merge(self, name: str, src: Path, method: str, exclusive: str = "sign") -> Path:
        out = self.work / name
        if not (out / "manifest.json").is_file():
            qmerge.merge_pack(src, out, method, exclusive=Policy(codec=exclusive))
        return out

    def score_pack(self, pack: Path, route: str, preds: dict[str, list[str]] | None = None
                   ) -> dict[str, float]:
        """Accuracy per task of a pack: the encoder routed by `route` ('oracle': the true
        task; 'base': the backbone alone, i.e. a static merge; 'router': `preds`), scored
        with the true task's head on the pooled output."""
        model = qmerge.load(self.base, pack)
        pk = qmerge.open_pack(pack)
        pooled: list[torch.Tensor] = []
        h = model.bert.pooler.register_forward_hook(lambda _m, _a, out: pooled.append(out))
        out = {}
        try:
            for t in self.names:
                head = pk.heads(t)
                w, b = head["classifier.weight"].float(), head["classifier.bias"].float()
                right = n = 0
                with torch.no_grad():
                    for i, (enc, y) in enumerate(self.batches(t)):
                        if route == "oracle":
                            groups = {t: list(range(len(y)))}
                        elif route == "base":
                            groups = {"base": list(range(len(y)))}
                        else:
                            assert preds is not None
                            groups = {}
                            for k, p in enumerate(preds[t][i * 64:i * 64 + len(y)]):
                                groups.setdefault(p, []).append(k)
                        # one forward per routed task: the hook then sees rows in order
                        pooled_rows = torch.empty(len(y), w.shape[1])
                        for task, rows in groups.items():
                            idx = torch.tensor(rows)
                            pooled.clear()
                            model(**{k: v[idx] for k, v in enc.items()}, task=task)
                            pooled_rows[idx] = pooled[-1]
                        logits = pooled_rows @ w.T + b
                        right += int((logits.argmax(-1) == y).sum())
                        n += len(y)
                out[t] = right / n
        finally:
            h.remove()
            qmerge.unload(model)
        return out

    def router_preds(self, pack: Path, kind: str, per_task: int = 32
                     ) -> tuple[dict[str, list[str]], float]:
        model = qmerge.load(self.base, pack)
        examples = {t: [x for x, _ in self.tasks[t].train[:per_task]] for t in self.names}
        router = qmerge.fit_router(model, examples, kind=kind, encode=self.enc, save=False)
        preds, right, n = {}, 0, 0
        for t in self.names:
            preds[t] = []
            for enc, _ in self.batches(t):
                feats = model.qmerge.features(enc, router.layer)
                preds[t] += router.predict(feats)
            right += sum(p == t for p in preds[t])
            n += len(preds[t])
        qmerge.unload(model)
        return preds, right / n


def setups_minilm(s: MiniLM, log) -> list[dict]:
    rows = []
    ceiling = s.score_model(s.finetuned)

    def add(name: str, group: str, acc: dict[str, float], pack: Path | None, note: str = ""):
        bytes_task, lin_bits, all_bits = linear_bits(pack) if pack else (None, None, None)
        if name == "individual fine-tunes":
            bytes_task = sum((s.fts[t] / "model.safetensors").stat().st_size
                             for t in s.names) / len(s.names)
            lin_bits = all_bits = 32.0
        norm = {t: acc[t] / ceiling[t] for t in s.names}
        rows.append({"setup": name, "group": group, "acc": acc, "norm": norm,
                     "avg_acc": statistics.mean(acc.values()),
                     "avg_norm": statistics.mean(norm.values()), "bytes_per_task": bytes_task,
                     "linear_bits": lin_bits, "all_bits": all_bits, "note": note})
        log(f"  seed {s.seed} {name}: acc {rows[-1]['avg_acc']:.3f} norm "
            f"{rows[-1]['avg_norm']:.3f}" + (f" linear bits {lin_bits:.3f}" if lin_bits else ""))

    add("base + head (floor)", "reference", s.score_model(s.floor), None)
    add("individual fine-tunes", "reference", ceiling, None)
    exact = Policy(codec="dense:dtype=fp32", vectors="dense:dtype=fp32",
                   types={"norm": "dense:dtype=fp32"})
    dense = s.compress("dense", exact)
    for name, method in (("task arithmetic (λ=0.3)", "task_arithmetic"),
                         ("TIES (k=20%, λ=1)", "ties"),
                         ("DARE (p=0.9) + TA (λ=0.3)", "dare"),
                         ("LiNeS (α=1/T, β=0.5) on TA", "lines")):
        pack = s.merge(method, dense, method)
        add(name, "static merge", s.score_pack(pack, "base"), pack)
    sign = s.compress("sign", Policy(codec="sign"))
    preds_p, route_p = s.router_preds(sign, "prototype")
    preds_l, route_l = s.router_preds(sign, "linear")
    log(f"  seed {s.seed} routers: prototype {route_p:.3f}, linear {route_l:.3f}")
    emr = s.merge("emr", dense, "emr")
    add("EMR (unified + 1-bit masks), oracle ids", "shared+exclusive", s.score_pack(emr, "oracle"),
        emr)
    twin = s.merge("twin-sign", dense, "twin", "sign")
    add("Twin (TIES shared + 1-bit exclusive), oracle ids", "shared+exclusive",
        s.score_pack(twin, "oracle"), twin)
    add("Twin (TIES shared + 1-bit exclusive), prototype router", "shared+exclusive",
        s.score_pack(twin, "router", preds_p), twin, f"routing accuracy {route_p:.3f}")
    twin_lr = s.merge("twin-lowrank16", dense, "twin", "lowrank:rank=16")
    add("Twin (TIES shared + low-rank 16 exclusive), oracle ids", "shared+exclusive",
        s.score_pack(twin_lr, "oracle"), twin_lr)
    add("routed sign per-row, oracle ids", "routed", s.score_pack(sign, "oracle"), sign)
    add("routed sign per-row, prototype router", "routed", s.score_pack(sign, "router", preds_p),
        sign, f"routing accuracy {route_p:.3f}")
    add("routed sign per-row, linear router", "routed", s.score_pack(sign, "router", preds_l),
        sign, f"routing accuracy {route_l:.3f}")
    cal = s.compress("sign-calibrated", Policy(codec="sign:calibrate=true"), calib=True)
    add("routed sign calibrated, oracle ids", "routed", s.score_pack(cal, "oracle"), cal)
    add("routed sign calibrated, prototype router", "routed",
        s.score_pack(cal, "router", preds_p), cal, f"routing accuracy {route_p:.3f}")
    for r in (8, 16, 32):
        lr = s.compress(f"lowrank{r}", Policy(codec=f"lowrank:rank={r}"))
        add(f"routed low-rank r={r}, oracle ids", "routed", s.score_pack(lr, "oracle"), lr)
    auto = s.compress("auto", Policy(codec="auto"))
    add("routed auto (SQNR 6 dB), oracle ids", "routed", s.score_pack(auto, "oracle"), auto)
    return rows


# --- report ------------------------------------------------------------------------------


def summarize(per_seed: dict[int, list[dict]]) -> list[dict]:
    seeds = sorted(per_seed)
    out = []
    for i, row in enumerate(per_seed[seeds[0]]):
        runs = [per_seed[s][i] for s in seeds]
        acc = [r["avg_acc"] for r in runs]
        norm = [r["avg_norm"] for r in runs]
        tasks = list(row["acc"])
        out.append(row | {
            "acc_mean": statistics.mean(acc), "acc_spread": max(acc) - min(acc),
            "norm_mean": statistics.mean(norm), "norm_spread": max(norm) - min(norm),
            "task_acc": {t: statistics.mean(r["acc"][t] for r in runs) for t in tasks},
            "task_norm": {t: statistics.mean(r["norm"][t] for r in runs) for t in tasks}})
    return out


def _b(x):
    return "—" if x is None else f"{x / 2**20:.2f}"


def _f(x, d=3):
    return "—" if x is None else f"{x:.{d}f}"


def table(rows: list[dict], seeds: list[int]) -> list[str]:
    tasks = list(rows[0]["acc"])
    head = ("| setup | " + " | ".join(tasks) + " | avg acc | avg normalized | spread (norm) | "
            "MB per task | bits/param linear | bits/param all |")
    lines = [head, "|" + "---|" * (len(tasks) + 7)]
    for r in rows:
        cells = [f"{r['task_acc'][t]:.3f}" for t in tasks]
        lines.append(f"| {r['setup']} | " + " | ".join(cells) + f" | {r['acc_mean']:.3f} | "
                     f"**{r['norm_mean'] * 100:.1f}%** | {r['norm_spread'] * 100:.1f} | "
                     f"{_b(r['bytes_per_task'])} | {_f(r['linear_bits'])} | "
                     f"{_f(r['all_bits'])} |")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"reference": "k", "static merge": "tab:red", "shared+exclusive": "tab:green",
              "routed": "tab:blue"}
    for r in rows:
        x = r["bytes_per_task"] / 2**20 if r["bytes_per_task"] else 0.05
        ax.scatter(x, r["norm_mean"] * 100, c=colors[r["group"]], label=r["group"])
        ax.annotate(r["setup"].split(",")[0][:28], (x, r["norm_mean"] * 100), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("stored MB per task (merged packs: shared delta divided among the tasks)")
    ax.set_ylabel("normalized accuracy, % of the individual fine-tunes")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-test", type=int, default=500, help="test examples per task")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps (MiniLM)")
    ap.add_argument("--tasks", default=",".join(task_data.ALL))
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.md")
    ap.add_argument("--reuse", action="store_true", help="take a seed's rows from its cached "
                    "JSON (bench/.cache/quality) when the same --max-test made it")
    a = ap.parse_args()
    task_data.ensure_data()
    torch.set_num_threads(2)
    seeds = [int(x) for x in a.seeds.split(",")]
    names = a.tasks.split(",")
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    per_seed = {}
    for seed in seeds:
        cached = CACHE / "quality" / f"minilm-s{seed}-n{a.max_test}.json"
        if a.reuse and cached.is_file():
            log(f"MiniLM seed {seed}: rows from {cached}")
            per_seed[seed] = json.loads(cached.read_text())
            continue
        log(f"MiniLM seed {seed}")
        per_seed[seed] = setups_minilm(MiniLM(seed, a.max_test, a.steps, names), log)
        cached.write_text(json.dumps(per_seed[seed]))
    rows = summarize(per_seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    png = a.out.with_suffix(".png")
    plot(rows, png, f"MiniLM-L6, {len(names)} tasks, {len(seeds)} seed(s)")
    cmd = " ".join(a for a in sys.argv[1:])
    text = [
        "# Quality: static merges vs routed compressed deltas",
        "",
        f"Command: `.venv/bin/python bench/quality/run.py {cmd}`".rstrip(),
        "",
        f"- date {time.strftime('%Y-%m-%d')}; torch {torch.__version__}; "
        f"{a.max_test} test examples per task at most; seeds {seeds}; "
        f"{time.time() - t0:.0f} s",
        "",
        "## MiniLM track (all-MiniLM-L6-v2, whole-encoder fine-tunes + per-task heads)",
        "",
        "Per-task accuracy is the mean over seeds; *normalized* is accuracy ÷ the individual "
        "fine-tune's, per task, averaged over tasks, then over seeds; *spread* is max − min of "
        "it over seeds (points). Bytes and bits/param are per task (a merged pack's shared "
        "delta is divided among the tasks); *linear* counts the attention/MLP matrices only.",
        "",
        *table(rows, seeds),
        "",
        f"![accuracy vs bytes]({png.name})",
        "",
    ]
    a.out.write_text("\n".join(text))
    (a.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
