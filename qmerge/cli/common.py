"""What every CLI verb module shares: argument types, the --json/--quiet options, reading
NAME=PATH pairs and codec policies, and progress bars. Entry points are thin (STYLE.md, 25):
a verb parses, calls one verb of qmerge.verbs, formats."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

from qmerge.codecs.policy import Policy
from qmerge.errors import ConfigError
from qmerge.verbs.progress import Progress, bars

Handler = Callable[[argparse.Namespace], dict]


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def name_path(value: str) -> tuple[str, str]:
    """NAME=PATH (a task and its checkpoint, or a task and its example file)."""
    name, eq, path = value.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def named(pairs: Iterable[tuple[str, str]], flag: str) -> dict[str, str]:
    """NAME=PATH pairs as a dict; a name given twice is an error naming the flag."""
    out: dict[str, str] = {}
    for name, path in pairs:
        if name in out:
            raise ConfigError(f"{flag} {name} is given twice")
        out[name] = path
    return out


def add_output(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def progress(args: argparse.Namespace, desc: str, unit: str = "tensor") -> Progress:
    """A progress-bar callable, off with --quiet or --json."""
    return bars(not (getattr(args, "quiet", False) or args.json), desc, unit)


def policy(path: str | None, codec: str) -> Policy:
    """The codec policy of --policy FILE (its default codec: --codec), or just --codec."""
    return Policy.from_file(path, codec=codec) if path else Policy(codec=codec)


def fmt_db(db: float | None) -> str:
    return "exact" if db is None else f"{db:.1f} dB"


def add_executor(p: argparse.ArgumentParser) -> None:
    """--executor, --ray-address, --workers: where a compress, add-task or merge runs."""
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: groups of tensors as Ray tasks, on a local "
        "Ray or the cluster at --ray-address (same bytes; needs ray, see README)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster ('auto': the one `ray start` runs here) instead of "
        "starting a local Ray",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="units in flight at once with --executor ray (default: the cluster's CPUs)",
    )


def executor(args: argparse.Namespace):
    """The executor the flags ask for (None: local), with its report for --json."""
    from qmerge.verbs.executor import resolve

    return resolve(args.executor, args.ray_address, args.workers)
