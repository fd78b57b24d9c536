"""The qmerge command line: one module per verb group, each a thin layer over qmerge.verbs.
Every verb has --help; --json prints one JSON object for scripts.

    qmerge compress --base DIR --task NAME=DIR ... --out PACK [--codec SPEC] [--policy FILE]
    qmerge add-task PACK --base DIR --task NAME=DIR ...
    qmerge remove-task PACK NAME ...
    qmerge verify PACK [--base DIR]
    qmerge inspect PACK [--worst K]
    qmerge fit-router PACK --base DIR --examples NAME=FILE ... [--kind prototype|linear]
    qmerge run PACK --base DIR [--task NAME | --coeffs MIX | --auto] (--text T ... | --jsonl F)
    qmerge export PACK --base DIR (--task T | --coeffs MIX | --shared) --out DIR [--format ...]
    qmerge merge PACK --method NAME [--option K=V ...] --out PACK2 [--exclusive-codec SPEC]
    qmerge serve PACK --base DIR [--host H] [--port N] [--max-batch B] [--batch-window-ms W]
    qmerge demo [--out-features N] [--in-features N] [--tasks T] [--dtype D]
    qmerge info

Codecs, merge methods, routers and export formats (their choices and help) come from their
registries. Bad input (a different base, mismatched tensors, NaN deltas, a corrupted pack, a
newer format) is reported as one line on stderr with exit status 1, and changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

from qmerge.cli import demo, export, infer, merge, pack, serve
from qmerge.errors import QmergeError

GROUPS = (pack, merge, infer, export, serve, demo)


def parser() -> argparse.ArgumentParser:
    """The parser, built from the registries as they are now (plugins included)."""
    top = argparse.ArgumentParser(
        prog="qmerge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for group in GROUPS:
        group.register(sub)
    return top


def _finite(obj):
    """`obj` with every NaN or inf float as null: JSON has no NaN, and a consumer's parser
    would refuse the whole answer."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fail(verb: str, message: str) -> int:
    """One line on stderr, exit status 1 (nothing was changed: writes are staged)."""
    print(f"qmerge {verb}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Ray's driver prints its workers' failures ("(raylet) A worker died ...") on stdout; with
    # --json, stdout holds only the answer, so during the work it goes to stderr.
    shield = getattr(args, "json", False) and getattr(args, "executor", "local") == "ray"
    try:
        with contextlib.redirect_stdout(sys.stderr) if shield else contextlib.nullcontext():
            result = args.handler(args)
    except QmergeError as e:
        return _fail(args.verb, str(e))
    except OSError as e:  # disk full, a path under a file, a directory where a file goes, ...
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args.verb, f"{where}{e.strerror or e}")
    except RecursionError:  # json: a file nested deeper than Python's stack
        return _fail(args.verb, "an input file is nested too deeply to read")
    except KeyboardInterrupt:
        print(f"qmerge {args.verb}: interrupted; nothing was changed", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(_finite(result), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
