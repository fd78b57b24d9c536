"""CLI verb: serve (the pack over HTTP, OpenAI-compatible)."""

from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(handler=run)
