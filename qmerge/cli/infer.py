"""CLI verbs of routed inference: run (answer texts) and fit-router."""

from __future__ import annotations

import argparse
from pathlib import Path

from qmerge.cli.common import add_output, name_path, named, positive_int, progress
from qmerge.nn.runtime import MODES
from qmerge.routing import ROUTERS
from qmerge.routing.prototype import METRICS
from qmerge.routing.router import MODES as ROUTE_MODES


def fit_router(args: argparse.Namespace) -> dict:
    from qmerge.verbs import run

    evaluate = named(args.eval, "--eval") if args.eval else None
    result = run.fit(
        args.pack,
        args.base,
        named(args.examples, "--examples"),
        kind=args.kind,
        layer=args.layer,
        mode=args.mode,
        temperature=args.temperature,
        max_examples=args.max_examples,
        metric=args.metric,
        evaluate=evaluate,
        progress=progress(args, "features", "task"),
    )
    if not args.json:
        r = result["router"]
        kind = r["kind"] + (f" ({r['metric']})" if "metric" in r else "")
        print(
            f"router: {kind} over {', '.join(r['tasks'])}, features after block "
            f"{r['layer']} ({r['pooling']}-pooled), mode {r['mode']}; examples: "
            + ", ".join(f"{t}={n}" for t, n in r["examples"].items())
        )
        if ev := result.get("evaluation"):
            print(f"held-out accuracy: {ev['accuracy']:.1%} of {ev['examples']}")
            tasks = r["tasks"]
            print("confusion (rows: true task, columns: routed to):")
            print("  " + " ".join(f"{t[:10]:>10}" for t in ["", *tasks]))
            for t, row in ev["confusion"].items():
                print("  " + f"{t[:10]:>10} " + " ".join(f"{row[c]:>10}" for c in tasks))
    return result


def run(args: argparse.Namespace) -> dict:
    from qmerge.verbs import run

    if args.jsonl:
        requests = run.read_requests(args.jsonl)
    else:
        requests = [{"text": t} for t in args.text]
    default = (
        {"task": args.task}
        if args.task
        else {"coeffs": args.coeffs}
        if args.coeffs
        else {"auto": True}
        if args.auto
        else {}
    )
    requests = [
        r if any(k in r for k in ("task", "coeffs", "auto")) else r | default for r in requests
    ]
    result = run.run(
        args.pack,
        args.base,
        requests,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
        progress=progress(args, "batches", "batch"),
    )
    if not args.json:
        for r in result["results"]:
            route = (
                r["route"]
                if isinstance(r["route"], str)
                else "+".join(f"{t}:{w:.3g}" for t, w in r["route"].items())
            )
            if "label" in r:
                answer = f"{r['label']} ({r['scores'][str(r['label'])]:.3f})"
            elif "output" in r:
                answer = repr(r["output"])
            else:
                answer = f"embedding[{len(r['embedding'])}]"
            print(f"[{route}] {r['text'][:60]!r} -> {answer}")
    return result


def register(sub: argparse._SubParsersAction) -> None:
    _fit_router_parser(sub)
    _run_parser(sub)


def _fit_router_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-router",
        help="fit the pack's router from example inputs per task",
        epilog="router kinds:\n" + ROUTERS.help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pack", type=Path)
    p.add_argument("--base", required=True, help="the base model directory (with tokenizer)")
    p.add_argument(
        "--examples",
        action="append",
        required=True,
        type=name_path,
        metavar="NAME=FILE",
        help="example inputs of a task: one per line, or JSONL "
        'with a "text" field (repeat per task)',
    )
    p.add_argument(
        "--kind",
        choices=ROUTERS.names(),
        default="prototype",
        help="the router (below; default: %(default)s)",
    )
    p.add_argument(
        "--metric",
        choices=METRICS,
        help="the prototype router's distance: under the examples' shared "
        "covariance, or cosine (default: mahalanobis)",
    )
    p.add_argument(
        "--layer", type=int, help="block whose output is the feature (default: 2/3 of the depth)"
    )
    p.add_argument(
        "--mode",
        choices=ROUTE_MODES,
        default="top1",
        help="one task per input, or a softmax mixture (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help="softmax temperature (default 0.05 prototype cosine, 1.0 otherwise)",
    )
    p.add_argument(
        "--max-examples",
        type=positive_int,
        default=32,
        help="examples used per task (default: %(default)s)",
    )
    p.add_argument(
        "--eval",
        action="append",
        type=name_path,
        metavar="NAME=FILE",
        help="held-out inputs of a task: report accuracy and confusion",
    )
    add_output(p)
    p.set_defaults(handler=fit_router)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="answer texts with a task, a mixture or the router")
    p.add_argument("pack", type=Path)
    p.add_argument("--base", required=True, help="the base model directory (with tokenizer)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--task", help="task for every request ('base' for the bare base)")
    how.add_argument(
        "--coeffs", metavar="MIX", help="mixture for every request, e.g. 'math:0.7+code:0.3'"
    )
    how.add_argument("--auto", action="store_true", help="route with the pack's router")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", action="append", help="an input text (repeatable)")
    what.add_argument(
        "--jsonl",
        type=Path,
        help="requests, one JSON object per line: "
        '{"text", and optionally "task" | "coeffs" | "auto"}',
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=32,
        help="tokens generated for a causal LM (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="requests per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--mode", choices=MODES, default="auto", help="execution path (default: %(default)s)"
    )
    add_output(p)
    p.set_defaults(handler=run)
