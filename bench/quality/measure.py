"""What both tracks of the quality benchmark share: stored bytes per task, the setups' row
records, the packs (calibrated through qmerge's public path, Options.calib_texts), and tuning
a static merge's scale on held-out data.

A track is an object with `names` (its tasks), `base` (the base model directory), `work` (its
packs), `score_pack(pack, route, preds)`, `score_state(state, split)` (accuracy per task of the
base with some tensors replaced) and `router_preds(pack, kind, metric)`; minilm.py and lm.py
are the two.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import qmerge
from qmerge.codecs.policy import Policy

MATRIX_TYPES = ("attention", "mlp", "other")
EXACT = Policy(
    codec="dense:dtype=fp32", vectors="dense:dtype=fp32", types={"norm": "dense:dtype=fp32"}
)

# Static merges, each with the scale (or LiNeS's depth slope) swept on held-out data and the
# value its paper uses. TA, TIES and DARE are linear in their scale: one shared delta at scale 1
# serves every grid point.
SWEEPS = {
    "task_arithmetic": ("scale", (0.1, 0.2, 0.3, 0.5, 0.8, 1.0), 0.3),
    "ties": ("scale", (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0), 1.0),
    "dare": ("scale", (0.1, 0.2, 0.3, 0.5, 0.8, 1.0), 0.3),
    "lines": ("beta", (0.1, 0.25, 0.5, 1.0, 2.0), 0.5),
}
LABELS = {
    "task_arithmetic": "task arithmetic",
    "ties": "TIES (k=20%)",
    "dare": "DARE (p=0.9) + TA",
    "lines": "LiNeS (α=1/T) on TA",
}
SYMBOL = {"scale": "λ", "beta": "β"}


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def pack_bits(pack: Path) -> tuple[float, float, float]:
    """(bytes per task incl. heads, bits/param of the compressed linear weights, bits/param
    of all the task's residuals), averaged over tasks; a merged pack's shared delta is
    divided among its tasks."""
    p = qmerge.open_pack(pack)
    lb = lp = ab = fb = 0
    for t in p.tasks:
        for e in p.entries(t).values():
            ab += e["bytes"]
            if len(e["shape"]) == 2 and e["module_type"] in MATRIX_TYPES:
                lp += e["params"]
                lb += e["bytes"]
        fb += p.manifest["files"][f"tasks/{t}.safetensors"]["bytes"]
    n = len(p.tasks)
    for e in p.shared_entries().values():
        ab += e["bytes"]
        if len(e["shape"]) == 2 and e["module_type"] in MATRIX_TYPES:
            lb += e["bytes"]
    fb += p.manifest["files"].get("shared.safetensors", {"bytes": 0})["bytes"]
    params = sum(_numel(x["shape"]) for x in p.base_fingerprint["tensors"].values())
    lin = sum(
        _numel(x["shape"])
        for k, x in p.base_fingerprint["tensors"].items()
        if len(x["shape"]) == 2 and qmerge.codecs.module_type(k) in MATRIX_TYPES
    )
    return fb / n, lb * 8 / (lin * n) if lin else 0.0, ab * 8 / (params * n)


class Rows:
    """The setups of one track and seed, scored against the individual fine-tunes."""

    def __init__(self, ceiling: dict[str, float], seed: int, log: Callable[[str], None]):
        self.ceiling, self.seed, self.log, self.rows = ceiling, seed, log, []

    def add(
        self,
        name: str,
        group: str,
        acc: dict[str, float],
        pack: Path | None = None,
        bits: tuple[float, float, float] | None = None,
        note: str = "",
    ) -> None:
        bytes_task, lin_bits, all_bits = bits or (pack_bits(pack) if pack else (None,) * 3)
        norm = {t: acc[t] / self.ceiling[t] if self.ceiling[t] else 0.0 for t in acc}
        self.rows.append(
            {
                "setup": name,
                "group": group,
                "acc": acc,
                "norm": norm,
                "avg_acc": statistics.mean(acc.values()),
                "avg_norm": statistics.mean(norm.values()),
                "bytes_per_task": bytes_task,
                "linear_bits": lin_bits,
                "all_bits": all_bits,
                "note": note,
            }
        )
        r = self.rows[-1]
        self.log(
            f"  seed {self.seed} {name}: acc {r['avg_acc']:.3f} norm {r['avg_norm']:.3f}"
            + (f" linear bits {lin_bits:.3f}" if lin_bits else "")
            + (f"; {note}" if note else "")
        )


@contextmanager
def swapped(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """`model` with the tensors of `state` copied into it, restored on exit."""
    params = model.state_dict()
    saved = {n: params[n].clone() for n in state}
    try:
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def static_merges(track, dense: Path, rows: Rows, sweeps: dict = SWEEPS) -> dict[str, dict]:
    """Every static merge with its scale tuned on the held-out split (the best average
    accuracy over the grid), then scored on the test split as a real merged pack; returns the
    sweep (method -> {value: held-out accuracy}) for the report."""
    base = {n: t.clone() for n, t in track.base_state().items()}
    out = {}
    for method, (knob, grid, paper) in sweeps.items():
        curve = {}
        if knob == "scale":
            shared = dict(qmerge.shared_deltas(dense, f"{method}:scale=1.0"))
            for v in grid:
                curve[v] = track.score_state({n: base[n] + v * d for n, d in shared.items()}, "val")
        else:
            for v in grid:
                shared = dict(qmerge.shared_deltas(dense, f"{method}:{knob}={v}"))
                curve[v] = track.score_state({n: base[n] + d for n, d in shared.items()}, "val")
            del shared
        best = max(grid, key=lambda v: statistics.mean(curve[v].values()))
        out[method] = {
            "knob": knob,
            "paper": paper,
            "best": best,
            "curve": {str(v): statistics.mean(c.values()) for v, c in curve.items()},
        }
        pack = track.merge(f"{method}-{knob}{best}", dense, f"{method}:{knob}={best}")
        rows.add(
            f"{LABELS[method]} ({SYMBOL[knob]}={best:g}, tuned)",
            "static merge",
            track.score_pack(pack, "base"),
            pack,
            note=f"held-out accuracy over {SYMBOL[knob]}: "
            + ", ".join(f"{v:g}: {statistics.mean(c.values()):.3f}" for v, c in curve.items()),
        )
    return out


def routed_setups(track, rows: Rows, dense: Path, calibrated: Path, sign: Path) -> None:
    """The setups both tracks share after the static merges: routers, EMR, Twin, routed
    codecs. `sign`/`calibrated` are 1-bit packs (per-row scales / calibrated scales)."""
    preds_m, route_m = track.router_preds(sign, "prototype", "mahalanobis")
    preds_c, route_c = track.router_preds(sign, "prototype", "cosine")
    preds_l, route_l = track.router_preds(sign, "linear", None)
    rows.log(
        f"  seed {rows.seed} routing accuracy: prototype (mahalanobis) {route_m:.3f}, "
        f"prototype (cosine) {route_c:.3f}, linear {route_l:.3f}"
    )
    routed = {
        "prototype router": (preds_m, route_m),
        "prototype router (cosine)": (preds_c, route_c),
        "linear router": (preds_l, route_l),
    }

    def via(pack: Path, name: str, group: str, how: str) -> None:
        if how == "oracle ids":
            rows.add(f"{name}, oracle ids", group, track.score_pack(pack, "oracle"), pack)
            return
        preds, acc = routed[how]
        rows.add(
            f"{name}, {how}",
            group,
            track.score_pack(pack, "router", preds),
            pack,
            note=f"routing accuracy {acc:.3f}",
        )

    emr = track.merge("emr", dense, "emr")
    via(emr, "EMR (unified + 1-bit masks)", "shared+exclusive", "oracle ids")
    twin = track.merge("twin-sign", dense, "twin", "sign")
    via(twin, "Twin (TIES shared + 1-bit exclusive)", "shared+exclusive", "oracle ids")
    via(twin, "Twin (TIES shared + 1-bit exclusive)", "shared+exclusive", "prototype router")
    twin_lr = track.merge("twin-lowrank16", dense, "twin", "lowrank:rank=16")
    via(twin_lr, "Twin (TIES shared + low-rank 16 exclusive)", "shared+exclusive", "oracle ids")
    for how in ("oracle ids", "prototype router", "linear router"):
        via(sign, "routed sign per-row", "routed", how)
    for how in ("oracle ids", "prototype router", "prototype router (cosine)", "linear router"):
        via(calibrated, "routed sign calibrated", "routed", how)
    for r in (8, 16, 32):
        via(
            track.compress(f"lowrank{r}", Policy(codec=f"lowrank:rank={r}")),
            f"routed low-rank r={r}",
            "routed",
            "oracle ids",
        )
    via(
        track.compress("auto", Policy(codec="auto")),
        "routed auto (SQNR 6 dB)",
        "routed",
        "oracle ids",
    )


def held_out(examples: list, max_test: int, n_val: int, task: str = "") -> tuple[list, list]:
    """(test, held-out): n_val examples taken at even steps through the first
    max_test + n_val, and up to max_test of the rest. Both come from the same stretch of the
    task's hash-ordered test split, so they share its class mix; its tail does not (once the
    common classes reach tasks.PER_CLASS_CAP, only the rare ones are left there)."""
    pool = examples[: max_test + n_val]
    if len(pool) <= n_val:
        raise SystemExit(
            f"task {task}: {len(examples)} test examples, need more than "
            f"{n_val} (the held-out split)"
        )
    step = len(pool) // n_val
    picked = set(range(step - 1, step * n_val, step))
    return (
        [x for i, x in enumerate(pool) if i not in picked][:max_test],
        [pool[i] for i in sorted(picked)],
    )


# Bumped whenever a change alters the rows of a seed, so that --reuse skips stale ones.
ROWS_VERSION = 2


class Track:
    """One track and seed: fine-tunes of `base` per task, their test and held-out splits, the
    packs made from them under `work`, and scoring. Subclasses give the model side:
    `encode`, `base_state`, `score_state`, `score_model`, `score_pack`, `calib_texts`."""

    heads: tuple[str, ...] = ()
    calib_max_length = 128  # tokens per calibration text (the track's own truncation)
    sweeps: dict = SWEEPS  # the static merges' grids (tests shorten them)

    def __init__(
        self,
        base: Path,
        fts: dict[str, Path],
        tasks: dict,
        work: Path,
        seed: int,
        max_test: int,
        n_val: int,
        router_examples: int,
    ):
        self.base, self.fts, self.tasks, self.seed = base, fts, tasks, seed
        self.names = list(fts)
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.router_examples = router_examples
        self.split = {"test": {}, "val": {}}
        for n in self.names:
            self.split["test"][n], self.split["val"][n] = held_out(
                tasks[n].test, max_test, n_val, n
            )

    def compress(self, name: str, policy: Policy, calib: bool = False) -> Path:
        """A pack of every task; with `calib`, scales calibrated through the public path
        (Options.calib_texts): each fine-tune reads its task's `calib_texts`, every token kept
        (the row cap is above what the texts give)."""
        out = self.work / name
        if not (out / "manifest.json").is_file():
            opts = qmerge.Options(policy=policy, heads=self.heads, progress=False)
            if calib:
                opts.calib_texts = {t: self.calib_texts(t) for t in self.names}
                opts.calib_rows = 1 << 20
                opts.calib_max_length = self.calib_max_length
            qmerge.compress(self.base, self.fts, out, opts=opts)
        return out

    def merge(self, name: str, src: Path, method: str, exclusive: str = "sign") -> Path:
        out = self.work / name
        if not (out / "manifest.json").is_file():
            qmerge.merge_pack(src, out, method, exclusive=Policy(codec=exclusive))
        return out

    def router_preds(
        self, pack: Path, kind: str, metric: str | None
    ) -> tuple[dict[str, list[str]], float]:
        """Predictions on the test split of a router fitted on `router_examples` training
        inputs per task (the base model's features), and its routing accuracy."""
        model = qmerge.load(self.base, pack)
        try:
            examples = {
                t: [self.prompt(t, x) for x, _ in self.tasks[t].train[: self.router_examples]]
                for t in self.names
            }
            router = qmerge.fit_router(
                model,
                examples,
                kind=kind,
                encode=self.encode,
                save=False,
                **({"metric": metric} if metric else {}),
            )
            preds, right, n = {}, 0, 0
            for t in self.names:
                data = self.split["test"][t]
                preds[t] = []
                for i in range(0, len(data), 64):
                    enc = self.encode([self.prompt(t, x) for x, _ in data[i : i + 64]])
                    preds[t] += router.predict(model.qmerge.features(enc, router.layer))
                right += sum(p == t for p in preds[t])
                n += len(preds[t])
        finally:
            qmerge.unload(model)
        return preds, right / n

    def prompt(self, task: str, text: str) -> str:
        return text


def track_setups(
    s: Track, log: Callable[[str], None], floor_name: str, floor: Callable[[str], torch.nn.Module]
) -> tuple[list[dict], dict]:
    """Every setup of one track and seed: (rows, the static merges' sweeps)."""
    rows = Rows(s.score_model(s.finetuned), s.seed, log)
    rows.add(floor_name, "reference", s.score_model(floor))
    size = sum((s.fts[t] / "model.safetensors").stat().st_size for t in s.names) / len(s.names)
    rows.add("individual fine-tunes", "reference", rows.ceiling, bits=(size, 32.0, 32.0))
    dense = s.compress("dense", EXACT)
    sweeps = static_merges(s, dense, rows, s.sweeps)
    sign = s.compress("sign", Policy(codec="sign"))
    calibrated = s.compress("sign-calibrated", Policy(codec="sign:calibrate=true"), calib=True)
    routed_setups(s, rows, dense, calibrated, sign)
    return rows.rows, sweeps
