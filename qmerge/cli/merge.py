"""CLI verb: merge (a pack's tasks through a registered merge method into a new pack)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qmerge.cli.common import add_executor, add_output, executor, policy, progress
from qmerge.codecs.base import key_values
from qmerge.merge import METHODS
from qmerge.merge.base import choose
from qmerge.verbs.merge import DEFAULT_SHARED_CODEC, merge_pack
from qmerge.verbs.packs import inspect


def _methods_help() -> str:
    lines = []
    for name in METHODS.names():
        e = METHODS.entry(name)
        doc = (e.item.config.__doc__ or "").strip()
        paper = f" ({e.paper})" if e.paper else ""
        lines.append(
            f"  {name}: {e.summary}{paper}\n    "
            + "\n    ".join(ln.strip() for ln in doc.splitlines() if ln.strip())
        )
    return "methods and their --option keys:\n" + "\n".join(lines)


def merge(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    choice = choose(args.method, key_values(args.option, "--option"))
    run = executor(args)
    merge_pack(
        args.pack,
        args.out,
        choice,
        shared_codec=args.shared_codec,
        exclusive=policy(args.exclusive_policy, args.exclusive_codec),
        overwrite=args.overwrite,
        progress=progress(args, f"merge ({args.method})", "tensor" if run is None else "unit"),
        executor=run,
        base=args.base,
    )
    result = inspect(args.out, worst=3)
    result["seconds"] = time.perf_counter() - t0
    result["executor"] = run.report.as_dict() if run is not None else {"executor": "local"}
    if not args.json:
        m = result["merge"]
        print(
            f"merged {len(result['tasks'])} task(s) with {m['method']} "
            f"{json.dumps(m['config'])} into {args.out}"
        )
        if shared := m["shared"]:
            print(
                f"  shared delta: {shared['bytes'] / 2**20:.2f} MiB, "
                f"{shared['bits_per_param']:.3f} bits/param"
            )
        for name, t in result["tasks"].items():
            print(
                f"  {name}: exclusive part {t['bytes'] / 2**20:.2f} MiB "
                f"({t['bits_per_param']:.3f} bits/param of what it changes)"
            )
        print(f"merge: done in {result['seconds']:.1f} s")
    return result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a pack's tasks (TIES, DARE, EMR, Twin, ...) into a new pack",
        epilog=_methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pack", type=Path, help="the pack whose tasks are merged")
    p.add_argument(
        "--method",
        required=True,
        choices=METHODS.names(),
        metavar="METHOD",
        help=f"one of {', '.join(METHODS.names())} (below)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable), e.g. --option density=0.2",
    )
    p.add_argument("--out", required=True, type=Path, help="the merged pack to write")
    p.add_argument(
        "--base",
        type=Path,
        help="the pack's base checkpoint, for methods that read the base's weights (slerp)",
    )
    p.add_argument(
        "--shared-codec",
        default=DEFAULT_SHARED_CODEC,
        help="codec spec of the shared delta (default: %(default)s)",
    )
    p.add_argument(
        "--exclusive-codec",
        default="sign",
        help="codec of the per-task exclusive parts (twin), as for compress (default: %(default)s)",
    )
    p.add_argument(
        "--exclusive-policy",
        metavar="FILE",
        help="JSON codec policy of the exclusive parts (as compress --policy)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack at --out")
    add_executor(p)
    add_output(p)
    p.set_defaults(handler=merge)
