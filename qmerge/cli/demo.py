"""CLI verbs: demo (the main job on an embedded default; --ops: the ops on one weight) and
info (versions, kernels)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from qmerge.cli.common import add_output, positive_int
from qmerge.dtypes import FLOAT_DTYPES


def _tasks(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


def demo(args: argparse.Namespace) -> dict:
    log = (lambda _msg: None) if args.json else print
    if args.ops:
        from qmerge.verbs.demo import ops

        return ops.demo(
            args.out_features, args.in_features, args.tasks_ops, FLOAT_DTYPES[args.dtype], log
        )
    import dataclasses

    from qmerge.verbs.demo import pipeline, report

    cfg = pipeline.Config(progress=not (args.quiet or args.json))
    cfg = dataclasses.replace(
        cfg,
        cache_dir=args.cache_dir or cfg.cache_dir,
        out=args.out,
        tasks=args.tasks,
        recipe=dataclasses.replace(cfg.recipe, steps=args.steps),
        max_test=args.max_test,
    )
    result = pipeline.run(cfg, log)
    out = cfg.out_dir()
    result["plot"] = str(p) if (p := report.plot(result, out / "demo.png")) else None
    tmp = out / f".demo.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "demo.json")
    result["json"] = str(out / "demo.json")
    if not args.json:
        report.show(result, log)
    return result


def info(args: argparse.Namespace) -> dict:
    from qmerge.verbs.demo import ops

    result = ops.info()
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def register(sub: argparse._SubParsersAction) -> None:
    from qmerge.verbs.demo.pipeline import TASKS, Config

    default = Config()
    p = sub.add_parser(
        "demo",
        help="the main job on real fine-tunes of all-MiniLM-L6-v2 (--ops: the kernels alone)",
        description="Fine-tunes all-MiniLM-L6-v2 on three text tasks (cached), compresses "
        "them to a calibrated 1-bit pack, verifies it, fits a router, answers mixed batches, "
        "builds a static merge and exports one task to int8; prints accuracy against MB per "
        "task and writes demo.png and demo.json. With --ops: the ops on one random weight.",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help=f"where fine-tunes are cached (default: {default.cache_dir})",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where the pack, merge, export and report go (default: CACHE_DIR/last-run)",
    )
    p.add_argument(
        "--tasks",
        type=_tasks,
        default=TASKS,
        help=f"comma-separated demo tasks (default: {','.join(TASKS)})",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=default.recipe.steps,
        help="fine-tuning steps per task (default: %(default)s)",
    )
    p.add_argument(
        "--max-test",
        type=positive_int,
        default=default.max_test,
        help="test texts per task (default: %(default)s)",
    )
    ops = p.add_argument_group("--ops: the kernels on one random weight")
    ops.add_argument("--ops", action="store_true", help="run the ops demo instead")
    ops.add_argument("--out-features", type=positive_int, default=4096, help="default: %(default)s")
    ops.add_argument("--in-features", type=positive_int, default=4096, help="default: %(default)s")
    ops.add_argument(
        "--ops-tasks",
        dest="tasks_ops",
        type=positive_int,
        default=4,
        help="fine-tunes (default: %(default)s)",
    )
    ops.add_argument(
        "--dtype", choices=sorted(FLOAT_DTYPES), default="bf16", help="default: %(default)s"
    )
    add_output(p)
    p.set_defaults(handler=demo)
    p = sub.add_parser("info", help="versions and which kernels are active")
    add_output(p, quiet=False)
    p.set_defaults(handler=info)
