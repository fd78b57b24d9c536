"""CLI verbs over packs: compress, add-task, remove-task, verify, inspect."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qmerge.cli.common import (
    add_executor,
    add_output,
    executor,
    fmt_db,
    name_path,
    named,
    policy,
    positive_int,
    progress,
)
from qmerge.codecs import CODECS
from qmerge.errors import ConfigError
from qmerge.format.safetensors_io import SafetensorsFile
from qmerge.verbs.compress import Options, add_task, compress, remove_task
from qmerge.verbs.packs import inspect, verify

CODEC_HELP = (
    "codec for weight matrices, as NAME or NAME:key=value,... (below; default: %(default)s), "
    "e.g. 'sign:granularity=group,group_size=128', 'lowrank:energy=0.9,factor_dtype=int8', "
    "'auto:sqnr_db=8'"
)


def _codecs_epilog() -> str:
    return (
        "codecs (--codec, and the values of a --policy file):\n"
        + CODECS.help()
        + "\n  auto: per tensor the cheapest codec that reaches auto:sqnr_db=N"
    )


def _calibration_options(p: argparse.ArgumentParser) -> None:
    """--calib, --calib-texts and what goes with them (calibrated and distilled scales)."""
    p.add_argument(
        "--calib",
        metavar="FILE",
        help="safetensors of calibration inputs "
        "[n, in_features] keyed by base tensor name, for 'sign:calibrate=true'",
    )
    p.add_argument(
        "--calib-texts",
        action="append",
        default=[],
        metavar="[TASK=]FILE",
        help="texts to calibrate 'sign:calibrate=true' scales on (one a line, or JSONL with "
        '"text"): each fine-tune (or the base, --calib-from base) is run over them and each '
        "linear layer's inputs are kept; one file for every task, or TASK=FILE per task "
        "(repeatable)",
    )
    p.add_argument(
        "--calib-from",
        choices=("finetune", "base"),
        default="finetune",
        help="the model that reads --calib-texts: each task's fine-tune (default), or the "
        "base once for every task (cheaper)",
    )
    p.add_argument(
        "--calib-rows",
        type=positive_int,
        default=512,
        help="inputs kept per layer from --calib-texts (bounds memory; default: %(default)s)",
    )
    p.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        metavar="N",
        help="then fit each task's 1-bit scales end to end for N Adam steps so the compressed "
        "model's outputs match the fine-tune's on --calib-texts (BitDelta's scale "
        "distillation; default 0: off)",
    )
    p.add_argument(
        "--distill-lr",
        type=float,
        default=1e-2,
        help="learning rate of the distillation (a multiplier per scale; default: %(default)s)",
    )


def _input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the base checkpoint (HF directory or file)")
    p.add_argument(
        "--task",
        dest="tasks",
        action="append",
        type=name_path,
        required=True,
        metavar="NAME=DIR",
        help="a fine-tune of the base, or a PEFT LoRA adapter of it (a directory with "
        "adapter_config.json; repeat for more)",
    )
    p.add_argument(
        "--adapter-as",
        choices=("lora", "policy"),
        default="lora",
        help="how a LoRA adapter's modules are stored: lora (its own factors, exactly; "
        "default) or policy (its product encoded with --codec/--policy like a fine-tune)",
    )
    p.add_argument("--codec", default="sign", help=CODEC_HELP)
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="JSON policy: codec per module type / tensor pattern / task (README)",
    )
    p.add_argument(
        "--lossless",
        action="store_true",
        help="every tensor (matrices, biases, norms) as an fp32 delta, checked to give back "
        "each fine-tune bit for bit: the input for merges",
    )
    _calibration_options(p)
    p.add_argument(
        "--allow-resized-vocab",
        action="store_true",
        help="store rows a fine-tune added to a tensor (grown vocabulary) densely",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out tensors matching GLOB, e.g. 'classifier.*' (repeatable)",
    )
    p.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep fine-tune tensors matching GLOB that the base lacks (a task head, "
        "e.g. 'classifier.*') per task, as they are (repeatable)",
    )
    add_executor(p)
    add_output(p)


def _calib_texts(values: list[str]) -> dict[str, str] | None:
    """--calib-texts values: FILE (every task) or TASK=FILE."""
    out: dict[str, str] = {}
    for v in values:
        task, eq, path = v.partition("=")
        key, path = (task, path) if eq and not Path(v).exists() else ("*", v)
        if key in out:
            raise ConfigError(f"--calib-texts gives {'every task' if key == '*' else key} twice")
        out[key] = path
    return out or None


def _options(args: argparse.Namespace) -> Options:
    calib = None
    if args.calib and args.calib_texts:
        raise ConfigError("give --calib (inputs) or --calib-texts (texts), not both")
    if args.calib:
        f = SafetensorsFile(args.calib, error=ConfigError)
        calib = {k: f.get(k).float() for k in f.keys()}
    if args.lossless and (args.policy or args.codec != "sign"):
        raise ConfigError("--lossless sets every tensor's codec: give no --codec or --policy")
    return Options(
        policy=policy(args.policy, args.codec),
        lossless=args.lossless,
        calib=calib,
        calib_texts=_calib_texts(args.calib_texts),
        calib_rows=args.calib_rows,
        calib_from=args.calib_from,
        distill_steps=args.distill_steps,
        distill_lr=args.distill_lr,
        allow_resized_vocab=args.allow_resized_vocab,
        adapter_as=args.adapter_as,
        exclude=tuple(args.exclude),
        heads=tuple(args.head),
        progress=not (args.quiet or args.json),
    )


def print_inspect(r: dict) -> None:
    print(
        f"pack {r['pack']} ({r['generator']}, format {r['format_version']}): "
        f"{len(r['tasks'])} task(s), {r['pack_bytes'] / 2**20:.2f} MiB; base "
        f"{r['base_params'] / 1e6:.1f}M params ({r['base_bytes_fp32'] / 2**20:.0f} MiB fp32)"
    )
    for name, t in r["tasks"].items():
        codecs = ", ".join(f"{k} x{v}" for k, v in sorted(t["codecs"].items()))
        print(
            f"  {name}: {t['file_bytes'] / 2**20:.2f} MiB, {t['bits_per_param']:.3f} bits/param, "
            f"worst SQNR {fmt_db(t['min_sqnr_db'])}  [{codecs}]"
        )
        for kind, s in t["by_module_type"].items():
            print(
                f"    {kind:<10} {s['params'] / 1e6:8.2f}M params  {s['bits_per_param']:7.3f} "
                f"bits/param  worst {fmt_db(s['min_sqnr_db'])}"
            )
        for w in t["worst_sqnr"]:
            print(f"    worst: {w['tensor']} ({w['codec']}) {fmt_db(w['sqnr_db'])}")


def _written(args: argparse.Namespace, pack: Path, t0: float, run=None) -> dict:
    result = inspect(pack, worst=3)
    result["seconds"] = time.perf_counter() - t0
    result["executor"] = run.report.as_dict() if run is not None else {"executor": "local"}
    if not args.json:
        print_inspect(result)
        how = ""
        if run is not None:
            r = run.report
            how = f" ({r.units} units on {r.workers} Ray workers, {r.retries} retried)"
        print(f"{args.verb}: done in {result['seconds']:.1f} s{how}")
    return result


def cmd_compress(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    run = executor(args)
    compress(
        args.base,
        named(args.tasks, "--task"),
        args.out,
        opts=_options(args),
        overwrite=args.overwrite,
        executor=run,
    )
    return _written(args, args.out, t0, run)


def cmd_add_task(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    run = executor(args)
    add_task(args.pack, args.base, named(args.tasks, "--task"), opts=_options(args), executor=run)
    return _written(args, args.pack, t0, run)


def cmd_remove_task(args: argparse.Namespace) -> dict:
    pack = remove_task(args.pack, args.names)
    if not args.json:
        print(f"removed {', '.join(args.names)}; tasks left: {', '.join(pack.tasks) or 'none'}")
    return {"pack": str(pack.path), "removed": args.names, "tasks": pack.tasks}


def cmd_verify(args: argparse.Namespace) -> dict:
    result = verify(args.pack, base=args.base, progress=progress(args, "sha256", "file"))
    if not args.json:
        print(
            f"ok: {result['pack']}: {len(result['tasks'])} task(s), {result['files_checked']} "
            f"file(s) match their sha256, base {result['base']}"
        )
        for stray in result["stray_files"]:
            print(
                f"note: {stray} is not in the manifest (left by an interrupted write); it is "
                f"safe to delete"
            )
        for left in result["leftover_dirs"]:
            print(f"note: {left} was being built by a writer that was killed; it is safe to delete")
    return result


def cmd_inspect(args: argparse.Namespace) -> dict:
    result = inspect(args.pack, worst=args.worst)
    if not args.json:
        print_inspect(result)
    return result


def register(sub: argparse._SubParsersAction) -> None:
    epilog = {"epilog": _codecs_epilog(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    p = sub.add_parser("compress", help="compress fine-tunes of a base into a new pack", **epilog)
    _input_options(p)
    p.add_argument("--out", required=True, type=Path, help="the pack directory to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing pack at --out (atomically, once the new one is done)",
    )
    p.set_defaults(handler=cmd_compress)
    p = sub.add_parser("add-task", help="add fine-tunes to an existing pack (same base)", **epilog)
    p.add_argument("pack", type=Path)
    _input_options(p)
    p.set_defaults(handler=cmd_add_task)
    p = sub.add_parser("remove-task", help="remove tasks from a pack")
    p.add_argument("pack", type=Path)
    p.add_argument("names", nargs="+", metavar="NAME")
    add_output(p)
    p.set_defaults(handler=cmd_remove_task)
    p = sub.add_parser("verify", help="check checksums, residuals and (with --base) the base")
    p.add_argument("pack", type=Path)
    p.add_argument("--base", help="also check the pack was made from this base")
    add_output(p)
    p.set_defaults(handler=cmd_verify)
    p = sub.add_parser("inspect", help="tasks, bytes, bits/param per module type, worst SQNR")
    p.add_argument("pack", type=Path)
    p.add_argument(
        "--worst", type=positive_int, default=5, help="tensors listed per task (default 5)"
    )
    add_output(p)
    p.set_defaults(handler=cmd_inspect)
