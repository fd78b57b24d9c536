"""CLI verb: serve (the pack over HTTP, OpenAI-compatible)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from qmerge.cli.common import positive_int
from qmerge.dtypes import FLOAT_DTYPES
from qmerge.errors import ConfigError
from qmerge.nn.runtime import MODES


def run(args: argparse.Namespace) -> dict:
    try:
        from qmerge.serve import Limits, serve
    except ImportError as e:
        raise ConfigError(
            f"qmerge serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn"
        ) from None
    if args.timeout_s <= 0 or args.batch_window_ms < 0:
        raise ConfigError("--timeout-s must be > 0 and --batch-window-ms >= 0")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    limits = Limits(
        max_batch=args.max_batch,
        window_ms=args.batch_window_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_inputs=max(64, args.max_batch),
        max_request_bytes=args.max_request_bytes,
        max_text_chars=64 * args.max_prompt_tokens,
    )
    if args.ray:
        return _serve_ray(args, limits)
    _no_ray_flags(args)
    serve(
        args.pack,
        args.base,
        host=args.host,
        port=args.port,
        limits=limits,
        dtype=FLOAT_DTYPES.get(args.dtype or ""),
        mode=args.mode,
        threads=args.threads,
        log_level=args.log_level,
    )
    return {"served": str(args.pack)}


RAY_FLAGS = {
    "address": "--address",
    "replicas": "--replicas",
    "min_replicas": "--min-replicas",
    "max_replicas": "--max-replicas",
    "max_packs": "--max-packs",
    "packs": "--pack",
    "name": "--name",
}


def _no_ray_flags(args: argparse.Namespace) -> None:
    for dest, flag in RAY_FLAGS.items():
        if getattr(args, dest) is not None:
            raise ConfigError(f"{flag} needs --ray")


def _pack_spec(text: str):
    from qmerge.serve.ray_replica import PackSpec

    name, eq, dirs = text.partition("=")
    pack, comma, base = dirs.partition(",")
    if not (eq and comma and name and pack and base):
        raise ConfigError(f"--pack {text!r}: write NAME=PACK_DIR,BASE_DIR")
    return PackSpec(name, pack, base)


def _serve_ray(args: argparse.Namespace, limits) -> dict:
    try:
        from qmerge.serve.ray import PackSpec, RayOptions, serve
    except ImportError as e:
        raise ConfigError(
            f"qmerge serve --ray needs Ray Serve ({e}); pip install 'ray[serve]==2.60.0'"
        ) from None
    name = args.name or args.pack.resolve().name
    packs = [PackSpec(name, str(args.pack), str(args.base))]
    packs += [_pack_spec(t) for t in args.packs or []]
    replicas = args.replicas or 1
    # torch threads per replica: a local Ray's cores shared among the replicas; 1 on a cluster
    threads = args.threads or (1 if args.address else max(1, (os.cpu_count() or 1) // replicas))
    options = RayOptions(
        replicas=replicas,
        min_replicas=args.min_replicas if args.min_replicas is not None else 1,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        threads=threads,
        max_packs=args.max_packs or 2,
        limits=limits,
        dtype=args.dtype,
        mode=args.mode,
    )
    serve(packs, options, address=args.address, host=args.host, port=args.port)
    return {"served": [p.name for p in packs]}


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group(
        "Ray Serve",
        "--ray serves through Ray Serve: several replicas (each qmerge's engine with every "
        "task of its packs) and several packs in one application, on one machine (a local Ray "
        "is started) or a cluster (--address auto, after `ray start`).",
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve")
    ray.add_argument("--address", help="a running Ray cluster ('auto': the one on this node)")
    ray.add_argument("--replicas", type=positive_int, help="model replicas (default: 1)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (default: 1)")
    ray.add_argument(
        "--max-replicas", type=positive_int, help="autoscaling: most replicas (turns it on)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=16.0,
        help="autoscaling: requests in flight per replica (default: %(default)s)",
    )
    ray.add_argument(
        "--pack",
        dest="packs",
        action="append",
        metavar="NAME=PACK_DIR,BASE_DIR",
        help="one more pack (any base), its tasks named NAME/task; repeatable",
    )
    ray.add_argument("--name", help="the first pack's name (default: its directory's name)")
    ray.add_argument(
        "--max-packs",
        type=positive_int,
        help="packs one replica holds besides the first, least recently used evicted (default: 2)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the pack over HTTP (OpenAI-compatible API): every "
        "request names its task, requests of different tasks share a batch",
        description="Serves one base and the pack's tasks over HTTP until "
        "interrupted: POST /v1/completions, /v1/chat/completions (causal LMs), "
        "/v1/classify (task heads); GET /v1/models, /health, /metrics; the "
        "OpenAPI spec at /openapi.json. The request's `model` is a task, "
        "'base', 'auto' (the pack's router) or a mixture 'a:0.7+b:0.3'. Tasks "
        "added to or removed from the pack on disk are picked up without a "
        "restart.",
    )
    p.add_argument("pack", type=Path)
    p.add_argument(
        "--base", required=True, type=Path, help="the base model directory (with its tokenizer)"
    )
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=32,
        help="sequences decoded in one batch (default: %(default)s)",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long an idle server waits for more requests to batch (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="requests waiting before the server answers 429 (default: %(default)s)",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="per-request time limit; 504 past it (default: %(default)s)",
    )
    p.add_argument(
        "--max-prompt-tokens", type=positive_int, default=2048, help="default: %(default)s"
    )
    p.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=4 << 20,
        help="largest request body, refused with 413 before it is parsed (default: %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=512,
        help="largest max_tokens a request may ask (default: %(default)s)",
    )
    p.add_argument(
        "--mode", choices=MODES, default="auto", help="execution path (default: %(default)s)"
    )
    p.add_argument(
        "--dtype",
        choices=list(FLOAT_DTYPES),
        help="load the base in this dtype (default: as stored)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: torch's; with --ray: per replica, default: this "
        "machine's cores / --replicas, 1 with --address)",
    )
    _add_ray_args(p)
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(handler=run)
