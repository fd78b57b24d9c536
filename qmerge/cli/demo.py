"""CLI verbs: demo (the main job on an embedded default) and info (versions, kernels)."""

from __future__ import annotations

import argparse

from qmerge.cli.common import add_output, positive_int
from qmerge.dtypes import FLOAT_DTYPES


def demo(args: argparse.Namespace) -> dict:
    from qmerge.verbs import demo

    log = (lambda _msg: None) if args.json else print
    return demo.demo(args.out_features, args.in_features, args.tasks, FLOAT_DTYPES[args.dtype], log)


def info(args: argparse.Namespace) -> dict:
    from qmerge.verbs import demo

    result = demo.info()
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the ops on one real-sized weight, checked and timed")
    p.add_argument("--out-features", type=positive_int, default=4096, help="default: %(default)s")
    p.add_argument("--in-features", type=positive_int, default=4096, help="default: %(default)s")
    p.add_argument(
        "--tasks", type=positive_int, default=4, help="fine-tunes (default: %(default)s)"
    )
    p.add_argument(
        "--dtype", choices=sorted(FLOAT_DTYPES), default="bf16", help="default: %(default)s"
    )
    add_output(p, quiet=False)
    p.set_defaults(handler=demo)
    p = sub.add_parser("info", help="versions and which kernels are active")
    add_output(p, quiet=False)
    p.set_defaults(handler=info)
