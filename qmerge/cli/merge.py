"""CLI verb: merge (a pack's tasks through a registered merge method into a new pack)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qmerge.cli.common import add_executor, add_output, executor, policy, progress
from qmerge.codecs.base import config_dict, key_values
from qmerge.errors import ConfigError
from qmerge.merge import METHODS
from qmerge.merge.base import choose
from qmerge.verbs import recipe
from qmerge.verbs.merge import DEFAULT_SHARED_CODEC, merge_pack
from qmerge.verbs.merge_direct import merge_to_model
from qmerge.verbs.packs import inspect, open_pack


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


def _recipe(args: argparse.Namespace, t0: float) -> dict:
    """merge --config RECIPE.yml: a mergekit recipe, to a model directory (or a pack)."""
    if args.method is not None or args.option:
        raise ConfigError("--config takes the method from the recipe: give no --method or --option")
    if args.to_mergekit:
        raise ConfigError("--config already is a mergekit recipe")
    if args.out is None:
        raise ConfigError("give --out (the merged model directory to write)")
    if args.pack is not None:
        return _recipe_over_pack(args, t0)
    r = recipe.read(args.config)
    if args.as_pack:
        report = _recipe_pack(args, r)
    else:
        report = merge_to_model(
            r.base,
            r.models,
            r.choice,
            args.out,
            dtype=r.out_dtype,
            overwrite=args.overwrite,
            progress=progress(args, f"merge ({r.mergekit_method})", "tensor"),
        )
    report |= {
        "recipe": str(args.config),
        "mergekit_method": r.mergekit_method,
        "method": r.choice.method.name,
        "config": config_dict(r.choice.config),
        "tasks": {t: str(p) for t, p in r.models.items()},
        "out": str(args.out),
        "seconds": time.perf_counter() - t0,
    }
    if not args.json:
        kind = "pack" if args.as_pack else "model directory"
        print(
            f"merged {len(r.models)} model(s) over {r.base} with {r.mergekit_method} "
            f"(qmerge {r.choice.method.name}) into the {kind} {args.out} "
            f"in {report['seconds']:.1f} s"
        )
    return report


def _recipe_pack(args: argparse.Namespace, r: recipe.Recipe) -> dict:
    """The recipe's models compressed losslessly into a scratch pack, then merged into a pack."""
    import shutil
    import tempfile

    from qmerge.verbs.compress import Options, compress

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".qmerge-recipe-", dir=Path(args.out).parent))
    try:
        opts = Options(lossless=True, progress=not args.json)
        compress(r.base, r.models, scratch / "exact", opts=opts)
        merge_pack(
            scratch / "exact",
            args.out,
            r.choice,
            shared_codec="dense:dtype=fp32",
            overwrite=args.overwrite,
            base=r.base,
            progress=progress(args, f"merge ({r.mergekit_method})", "tensor"),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"pack": inspect(args.out, worst=0)}


def _recipe_over_pack(args: argparse.Namespace, t0: float) -> dict:
    """PACK --config RECIPE.yml: the recipe's models are the pack's tasks; a merged pack."""
    pk = open_pack(args.pack)
    r = recipe.read(args.config, {t: pk.manifest["tasks"][t].get("source", t) for t in pk.tasks})
    base = args.base or (r.base if r.raw.get("base_model") else None)
    merge_pack(
        args.pack,
        args.out,
        r.choice,
        shared_codec=args.shared_codec,
        overwrite=args.overwrite,
        base=base,
        progress=progress(args, f"merge ({r.mergekit_method})", "tensor"),
    )
    result = inspect(args.out, worst=0) | {"mergekit_method": r.mergekit_method}
    result["seconds"] = time.perf_counter() - t0
    if not args.json:
        print(f"merged the tasks of {args.pack} with {r.mergekit_method} into {args.out}")
    return result


def _to_mergekit(args: argparse.Namespace, choice) -> dict:
    if args.base is None:
        raise ConfigError("--to-mergekit writes the base's path into the recipe: give --base")
    pk = open_pack(args.pack)
    models = {t: pk.manifest["tasks"][t].get("source", "") for t in pk.tasks}
    obj = recipe.to_mergekit(choice, args.base, models)
    recipe.write_yaml(obj, args.to_mergekit)
    if not args.json:
        print(f"wrote the mergekit recipe {args.to_mergekit} ({obj['merge_method']})")
    return {"mergekit_recipe": str(args.to_mergekit), "recipe": obj}


def merge(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    if args.config is not None:
        return _recipe(args, t0)
    if args.pack is None or args.method is None:
        raise ConfigError("give a PACK and --method, or --config RECIPE.yml")
    choice = choose(args.method, key_values(args.option, "--option"))
    written = _to_mergekit(args, choice) if args.to_mergekit else {}
    if args.out is None:
        if not written:
            raise ConfigError("give --out (the merged pack to write)")
        return written
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
    result |= written
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
    p.add_argument("pack", type=Path, nargs="?", help="the pack whose tasks are merged")
    p.add_argument(
        "--config",
        type=Path,
        metavar="RECIPE.yml",
        help="a mergekit recipe (merge_method, base_model, models, parameters, dtype): its "
        "fine-tunes merged straight into the model directory --out (no pack; see README)",
    )
    p.add_argument(
        "--as-pack",
        action="store_true",
        help="with --config: compress the recipe's models losslessly and write a merged pack",
    )
    p.add_argument(
        "--to-mergekit",
        type=Path,
        metavar="RECIPE.yml",
        help="write this merge (PACK, --method, --option, --base) as a mergekit recipe",
    )
    p.add_argument(
        "--method",
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
    p.add_argument(
        "--out",
        type=Path,
        help="the merged pack to write (with --config: the merged model directory)",
    )
    p.add_argument(
        "--base",
        type=Path,
        help="the pack's base checkpoint, for methods that read the base's weights (slerp, "
        "linear without normalize); checked against the pack",
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
