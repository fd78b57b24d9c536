"""CLI verb: export (a task or mixture baked into a model other runtimes load, checked)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qmerge.cli.common import add_output, positive_int, progress
from qmerge.dtypes import FLOAT_DTYPES
from qmerge.verbs.export import FORMATS, export
from qmerge.verbs.export.gguf_arch import TYPES


def run(args: argparse.Namespace) -> dict:
    from qmerge.verbs.run import read_texts

    r = export(
        args.pack,
        args.base,
        args.out,
        fmt=args.format,
        task=args.task,
        coeffs=args.coeffs,
        shared=args.shared,
        dtype=args.dtype,
        rank=args.rank,
        max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
        gguf_type=args.gguf_type,
        gguf_base=args.gguf_base,
        target=args.target,
        texts=read_texts(args.inputs) if args.inputs else None,
        check_inputs=args.check_inputs,
        new_tokens=args.check_tokens,
        tolerance=args.tolerance,
        min_agreement=args.min_agreement,
        overwrite=args.overwrite,
        progress=progress(args, "tensors"),
    )
    if not args.json:
        _print(r, args.rank)
    return r


def _print(r: dict, rank: int) -> None:
    c, z = r["check"], r["sizes"]
    print(f"exported {r['selection']} as {r['format']} ({r['class']}, {r['dtype']}) to {r['out']}")
    line = (
        f"check ({c['source']}, fresh process without qmerge): max abs {c['max_abs']:.3g}, "
        f"max rel {c['max_rel']:.3g}, agreement {c['agreement']:.1%} of {c['compared']}"
    )
    if "greedy_identical" in c:
        line += f", greedy continuations identical {c['greedy_identical']}"
    if c.get("runtime") and c["runtime"] != r["format"]:
        line += f" ({c['runtime']})"
    print(line + f"; {c['criterion']}: passed")
    ft = [b for b in z["finetune_bytes"].values() if b]
    print(
        f"sizes: export {z['export_bytes'] / 2**20:.2f} MiB, pack task file(s) "
        f"{z['pack_task_bytes'] / 2**20:.2f} MiB, base fp32 {z['base_fp32_bytes'] / 2**20:.2f} "
        f"MiB" + (f", fine-tune {ft[0] / 2**20:.2f} MiB" if len(ft) == 1 else "")
    )
    w = r["written"]
    if w.get("energy_left_out"):
        print(
            f"note: left out {len(w['left_out'])} tensor(s) the runtime cannot carry "
            f"({', '.join(w['left_out'][:3])}{', ...' if len(w['left_out']) > 3 else ''}): "
            f"{w['energy_left_out']:.2%} of the task vector's energy"
        )
    if (tk := w.get("tokenizer")) and tk.get("warning"):
        print(f"warning: {tk['warning']}")
    if (e := w.get("energy_kept_min")) is not None:
        print(
            f"note: {r['written']['svd_tensors']} residual(s) were not low-rank and were cut "
            f"to rank {rank} by SVD; the worst keeps {e:.1%} of its energy"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="bake a task or mixture into a model other runtimes load "
        f"({', '.join(FORMATS.names())}), checked against the routed model",
        epilog="formats:\n" + FORMATS.help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pack", type=Path)
    p.add_argument("--base", required=True, type=Path, help="the base model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="the task to export")
    what.add_argument("--coeffs", metavar="MIX", help="a mixture, e.g. 'math:0.7+code:0.3'")
    what.add_argument(
        "--shared", action="store_true", help="the pack's shared delta (written by merge methods)"
    )
    p.add_argument("--out", required=True, type=Path, help="the directory to write")
    p.add_argument(
        "--format",
        choices=FORMATS.names(),
        default="hf",
        help="the artifact (below; default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *FLOAT_DTYPES],
        default="auto",
        help="floating-point tensors written (default: the base's; fp32 for onnx, int8 and peft)",
    )
    p.add_argument(
        "--rank",
        type=positive_int,
        default=16,
        help="peft, gguf-lora: rank of the truncated "
        "SVD of a residual that is not low-rank (default: %(default)s)",
    )
    _runtime_options(p)
    p.add_argument(
        "--max-shard-mb",
        type=float,
        default=2048,
        help="hf: shard the weights above this size (default: %(default)s)",
    )
    p.add_argument(
        "--inputs",
        type=Path,
        help='texts for the check, one per line or JSONL with "text" (default: built-in texts)',
    )
    p.add_argument(
        "--check-inputs",
        type=positive_int,
        default=8,
        help="inputs the check runs (default: %(default)s)",
    )
    p.add_argument(
        "--check-tokens",
        type=int,
        default=16,
        help="greedy tokens per prompt for a causal LM (default: %(default)s)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="exact exports (fp32): largest error relative to the largest output "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="lossy exports: top-1 / next-token agreement (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_output(p)
    p.set_defaults(handler=run)


def _runtime_options(p: argparse.ArgumentParser) -> None:
    """The options of the llama.cpp and vLLM hand-offs."""
    p.add_argument(
        "--gguf-type",
        default="f16",
        metavar="TYPE[:output=TYPE]",
        help=f"gguf: type of the weight matrices ({', '.join(TYPES)}); the output layer and "
        "a tied embedding stay a step above a quantized type (f16 for q8_0, q8_0 below) "
        "unless :output= names theirs; norms f32. gguf-lora: f32, f16 or bf16 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--gguf-base",
        type=Path,
        metavar="FILE",
        help="gguf-lora: the base GGUF the adapter is checked over (default: the base is "
        "written beside the adapter as base.gguf)",
    )
    p.add_argument(
        "--target",
        choices=["vllm"],
        help="peft: write only what vLLM loads (one rank from its set, no modules_to_save; "
        "what is left out is reported)",
    )
