"""The qmerge command line. Every verb has --help; --json prints one JSON object for scripts.

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

Bad input (a different base, mismatched tensors, NaN deltas, a corrupted pack, a newer
format) is reported as one line on stderr with exit status 1, and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qmerge import api
from qmerge.codecs.policy import Policy
from qmerge.compressor import bar
from qmerge.errors import ConfigError, QmergeError
from qmerge.format.safetensors_io import SafetensorsFile

CODEC_HELP = ("codec for weight matrices: sign (1 bit + per-row scales), lowrank, auto, or a "
              "spec such as 'sign:granularity=group,group_size=128', 'lowrank:energy=0.9,"
              "factor_dtype=int8', 'auto:sqnr_db=8' (default: %(default)s)")


def _task_arg(value: str) -> tuple[str, str]:
    name, eq, path = value.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def _add_codec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the base checkpoint (HF directory or file)")
    p.add_argument("--task", dest="tasks", action="append", type=_task_arg, required=True,
                   metavar="NAME=DIR", help="a fine-tune of the base (repeat for more)")
    p.add_argument("--codec", default="sign", help=CODEC_HELP)
    p.add_argument("--policy", metavar="FILE",
                   help="JSON policy: codec per module type / tensor pattern / task (README)")
    p.add_argument("--calib", metavar="FILE", help="safetensors of calibration inputs "
                   "[n, in_features] keyed by base tensor name, for 'sign:calibrate=true'")
    p.add_argument("--allow-resized-vocab", action="store_true",
                   help="store rows a fine-tune added to a tensor (grown vocabulary) densely")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out tensors matching GLOB, e.g. 'classifier.*' (repeatable)")
    p.add_argument("--head", action="append", default=[], metavar="GLOB",
                   help="keep fine-tune tensors matching GLOB that the base lacks (a task head, "
                        "e.g. 'classifier.*') per task, as they are (repeatable)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace) -> api.Options:
    policy = (Policy.from_file(args.policy, codec=args.codec) if args.policy
              else Policy(codec=args.codec))
    calib = None
    if args.calib:
        f = SafetensorsFile(args.calib, error=ConfigError)
        calib = {k: f.get(k).float() for k in f.keys()}
    return api.Options(policy=policy, calib=calib, allow_resized_vocab=args.allow_resized_vocab,
                       exclude=tuple(args.exclude), heads=tuple(args.head),
                       progress=not (args.quiet or args.json))


def _tasks(args: argparse.Namespace) -> dict[str, str]:
    tasks: dict[str, str] = {}
    for name, path in args.tasks:
        if name in tasks:
            raise ConfigError(f"--task {name} is given twice")
        tasks[name] = path
    return tasks


def _fmt_db(db: float | None) -> str:
    return "exact" if db is None else f"{db:.1f} dB"


def _print_inspect(r: dict) -> None:
    print(f"pack {r['pack']} ({r['generator']}, format {r['format_version']}): "
          f"{len(r['tasks'])} task(s), {r['pack_bytes'] / 2**20:.2f} MiB; base "
          f"{r['base_params'] / 1e6:.1f}M params ({r['base_bytes_fp32'] / 2**20:.0f} MiB fp32)")
    for name, t in r["tasks"].items():
        codecs = ", ".join(f"{k} x{v}" for k, v in sorted(t["codecs"].items()))
        print(f"  {name}: {t['file_bytes'] / 2**20:.2f} MiB, {t['bits_per_param']:.3f} bits/param, "
              f"worst SQNR {_fmt_db(t['min_sqnr_db'])}  [{codecs}]")
        for kind, s in t["by_module_type"].items():
            print(f"    {kind:<10} {s['params'] / 1e6:8.2f}M params  {s['bits_per_param']:7.3f} "
                  f"bits/param  worst {_fmt_db(s['min_sqnr_db'])}")
        for w in t["worst_sqnr"]:
            print(f"    worst: {w['tensor']} ({w['codec']}) {_fmt_db(w['sqnr_db'])}")


def _run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    if args.verb in ("compress", "add-task"):
        opts, tasks = _options(args), _tasks(args)
        if args.verb == "compress":
            api.compress(args.base, tasks, args.out, opts=opts, overwrite=args.overwrite)
            pack = args.out
        else:
            api.add_task(args.pack, args.base, tasks, opts=opts)
            pack = args.pack
        result = api.inspect(pack, worst=3)
        result["seconds"] = time.perf_counter() - t0
        if not args.json:
            _print_inspect(result)
            print(f"{args.verb}: done in {result['seconds']:.1f} s")
        return result
    if args.verb == "merge":
        return _merge(args, t0)
    if args.verb == "remove-task":
        pack = api.remove_task(args.pack, args.names)
        result = {"pack": str(pack.path), "removed": args.names, "tasks": pack.tasks}
        if not args.json:
            print(f"removed {', '.join(args.names)}; tasks left: {', '.join(pack.tasks) or 'none'}")
        return result
    if args.verb == "verify":
        enabled = not (args.quiet or args.json)
        result = api.verify(args.pack, base=args.base,
                            progress=lambda it: bar(it, enabled, "sha256", unit="file"))
        if not args.json:
            print(f"ok: {result['pack']}: {len(result['tasks'])} task(s), "
                  f"{result['files_checked']} file(s) match their sha256, base "
                  f"{result['base']}")
            for stray in result["stray_files"]:
                print(f"note: {stray} is not in the manifest (left by an interrupted write); "
                      f"it is safe to delete")
        return result
    if args.verb == "inspect":
        result = api.inspect(args.pack, worst=args.worst)
        if not args.json:
            _print_inspect(result)
        return result
    if args.verb in ("run", "fit-router"):
        return _infer(args)
    if args.verb == "export":
        return _export(args)
    if args.verb == "serve":
        return _serve(args)
    from qmerge import demo

    if args.verb == "demo":
        log = (lambda _msg: None) if args.json else print
        return demo.demo(args.out_features, args.in_features, args.tasks,
                         demo.DTYPES[args.dtype], log)
    result = demo.info()
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def _infer(args: argparse.Namespace) -> dict:
    from qmerge import inference

    enabled = not (args.quiet or args.json)
    if args.verb == "fit-router":
        result = inference.fit(
            args.pack, args.base, dict(args.examples), kind=args.kind, layer=args.layer,
            mode=args.mode, temperature=args.temperature, max_examples=args.max_examples,
            metric=args.metric, evaluate=dict(args.eval) if args.eval else None,
            progress=lambda it: bar(it, enabled, "features", unit="task"))
        if not args.json:
            r = result["router"]
            kind = r["kind"] + (f" ({r['metric']})" if "metric" in r else "")
            print(f"router: {kind} over {', '.join(r['tasks'])}, features after block "
                  f"{r['layer']} ({r['pooling']}-pooled), mode {r['mode']}; examples: "
                  + ", ".join(f"{t}={n}" for t, n in r["examples"].items()))
            if ev := result.get("evaluation"):
                print(f"held-out accuracy: {ev['accuracy']:.1%} of {ev['examples']}")
                tasks = r["tasks"]
                print("confusion (rows: true task, columns: routed to):")
                print("  " + " ".join(f"{t[:10]:>10}" for t in ["", *tasks]))
                for t, row in ev["confusion"].items():
                    print("  " + f"{t[:10]:>10} " + " ".join(f"{row[c]:>10}" for c in tasks))
        return result
    if args.jsonl:
        requests = inference.read_requests(args.jsonl)
    else:
        requests = [{"text": t} for t in args.text]
    default = ({"task": args.task} if args.task else {"coeffs": args.coeffs} if args.coeffs
               else {"auto": True} if args.auto else {})
    requests = [r if any(k in r for k in ("task", "coeffs", "auto")) else r | default
                for r in requests]
    result = inference.run(args.pack, args.base, requests, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, mode=args.mode,
                           progress=lambda it: bar(it, enabled, "batches", unit="batch"))
    if not args.json:
        for r in result["results"]:
            route = r["route"] if isinstance(r["route"], str) else "+".join(
                f"{t}:{w:.3g}" for t, w in r["route"].items())
            if "label" in r:
                answer = f"{r['label']} ({r['scores'][str(r['label'])]:.3f})"
            elif "output" in r:
                answer = repr(r["output"])
            else:
                answer = f"embedding[{len(r['embedding'])}]"
            print(f"[{route}] {r['text'][:60]!r} -> {answer}")
    return result


def _export(args: argparse.Namespace) -> dict:
    from qmerge.inference import read_texts

    enabled = not (args.quiet or args.json)
    texts = read_texts(args.inputs) if args.inputs else None
    r = api.export(args.pack, args.base, args.out, fmt=args.format, task=args.task,
                   coeffs=args.coeffs, shared=args.shared, dtype=args.dtype, rank=args.rank,
                   max_shard_bytes=int(args.max_shard_mb * (1 << 20)), texts=texts,
                   check_inputs=args.check_inputs, new_tokens=args.check_tokens,
                   tolerance=args.tolerance, min_agreement=args.min_agreement,
                   overwrite=args.overwrite,
                   progress=lambda it: bar(it, enabled, "tensors", unit="tensor"))
    if not args.json:
        c, z = r["check"], r["sizes"]
        print(f"exported {r['selection']} as {r['format']} ({r['class']}, {r['dtype']}) to "
              f"{r['out']}")
        line = (f"check ({c['source']}, fresh process without qmerge): max abs "
                f"{c['max_abs']:.3g}, max rel {c['max_rel']:.3g}, agreement "
                f"{c['agreement']:.1%} of {c['compared']}")
        if "greedy_identical" in c:
            line += f", greedy continuations identical {c['greedy_identical']}"
        print(line + f"; {c['criterion']}: passed")
        ft = [b for b in z["finetune_bytes"].values() if b]
        print(f"sizes: export {z['export_bytes'] / 2**20:.2f} MiB, pack task file(s) "
              f"{z['pack_task_bytes'] / 2**20:.2f} MiB, base fp32 "
              f"{z['base_fp32_bytes'] / 2**20:.2f} MiB"
              + (f", fine-tune {ft[0] / 2**20:.2f} MiB" if len(ft) == 1 else ""))
        if (e := r["written"].get("energy_kept_min")) is not None:
            print(f"note: {r['written']['svd_tensors']} residual(s) were not low-rank and were "
                  f"cut to rank {args.rank} by SVD; the worst keeps {e:.1%} of its energy")
    return r


def _serve(args: argparse.Namespace) -> dict:
    import logging

    import torch

    try:
        from qmerge.serve import Limits, serve
    except ImportError as e:
        raise ConfigError(f"qmerge serve needs fastapi and uvicorn ({e}); pip install "
                          f"fastapi uvicorn") from None
    if args.timeout_s <= 0 or args.batch_window_ms < 0:
        raise ConfigError("--timeout-s must be > 0 and --batch-window-ms >= 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s "
                        "%(levelname)s: %(message)s")
    limits = Limits(max_batch=args.max_batch, window_ms=args.batch_window_ms,
                    max_queue=args.max_queue, timeout_s=args.timeout_s,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    max_inputs=max(64, args.max_batch))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype or "")
    serve(args.pack, args.base, host=args.host, port=args.port, limits=limits, dtype=dtype,
          mode=args.mode, threads=args.threads, log_level=args.log_level)
    return {"served": str(args.pack)}


def _merge(args: argparse.Namespace, t0: float) -> dict:
    from qmerge.merge import METHODS, make_config

    values = {}
    for item in args.option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        values[key] = value
    if args.method not in METHODS:
        raise ConfigError(f"unknown merge method {args.method!r}; known: "
                          f"{', '.join(sorted(METHODS))}")
    cfg = make_config(args.method, values)
    exclusive = (Policy.from_file(args.exclusive_policy, codec=args.exclusive_codec)
                 if args.exclusive_policy else Policy(codec=args.exclusive_codec))
    enabled = not (args.quiet or args.json)
    api.merge_pack(args.pack, args.out, args.method, cfg, shared_codec=args.shared_codec,
              exclusive=exclusive, overwrite=args.overwrite,
              progress=lambda it: bar(it, enabled, f"merge ({args.method})"))
    result = api.inspect(args.out, worst=3)
    result["seconds"] = time.perf_counter() - t0
    if not args.json:
        m = result["merge"]
        shared = m["shared"]
        print(f"merged {len(result['tasks'])} task(s) with {m['method']} "
              f"{json.dumps(m['config'])} into {args.out}")
        if shared:
            print(f"  shared delta: {shared['bytes'] / 2**20:.2f} MiB, "
                  f"{shared['bits_per_param']:.3f} bits/param")
        for name, t in result["tasks"].items():
            print(f"  {name}: exclusive part {t['bytes'] / 2**20:.2f} MiB "
                  f"({t['bits_per_param']:.3f} bits/param of what it changes)")
        print(f"merge: done in {result['seconds']:.1f} s")
    return result


def _merge_help() -> str:
    from qmerge.merge import METHODS

    lines = []
    for name, m in sorted(METHODS.items()):
        doc = (m.config.__doc__ or "").strip()
        lines.append(f"  {name}: {m.summary}\n    " + "\n    ".join(
            ln.strip() for ln in doc.splitlines() if ln.strip()))
    return "methods and their --option keys:\n" + "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="qmerge", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = sub.add_parser("compress", help="compress fine-tunes of a base into a new pack")
    _add_codec_options(p)
    p.add_argument("--out", required=True, type=Path, help="the pack directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing pack at --out (atomically, once the new one is done)")
    _common(p)
    p = sub.add_parser("add-task", help="add fine-tunes to an existing pack (same base)")
    p.add_argument("pack", type=Path)
    _add_codec_options(p)
    _common(p)
    p = sub.add_parser("merge", help="merge a pack's tasks (TIES, DARE, EMR, Twin, ...) into a "
                       "new pack", epilog=_merge_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pack", type=Path, help="the pack whose tasks are merged")
    p.add_argument("--method", required=True, help="task_arithmetic, ties, dare, lines, emr or "
                   "twin (below)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. --option density=0.2")
    p.add_argument("--out", required=True, type=Path, help="the merged pack to write")
    p.add_argument("--shared-codec", default="dense:dtype=bf16",
                   help="codec spec of the shared delta (default: %(default)s)")
    p.add_argument("--exclusive-codec", default="sign",
                   help="codec of the per-task exclusive parts (twin), as for compress "
                   "(default: %(default)s)")
    p.add_argument("--exclusive-policy", metavar="FILE", help="JSON codec policy of the "
                   "exclusive parts (as compress --policy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack at --out")
    _common(p)
    p = sub.add_parser("remove-task", help="remove tasks from a pack")
    p.add_argument("pack", type=Path)
    p.add_argument("names", nargs="+", metavar="NAME")
    _common(p)
    p = sub.add_parser("verify", help="check checksums, residuals and (with --base) the base")
    p.add_argument("pack", type=Path)
    p.add_argument("--base", help="also check the pack was made from this base")
    _common(p)
    p = sub.add_parser("inspect", help="tasks, bytes, bits/param per module type, worst SQNR")
    p.add_argument("pack", type=Path)
    p.add_argument("--worst", type=int, default=5, help="tensors listed per task (default 5)")
    _common(p)
    p = sub.add_parser("fit-router", help="fit the pack's router from example inputs per task")
    p.add_argument("pack", type=Path)
    p.add_argument("--base", required=True, help="the base model directory (with tokenizer)")
    p.add_argument("--examples", action="append", required=True, type=_task_arg,
                   metavar="NAME=FILE", help="example inputs of a task: one per line, or JSONL "
                   "with a \"text\" field (repeat per task)")
    p.add_argument("--kind", choices=["prototype", "linear"], default="prototype",
                   help="prototype: no training, distance to each task's mean feature; linear: "
                   "logistic regression (default: %(default)s)")
    p.add_argument("--metric", choices=["mahalanobis", "cosine"], default="mahalanobis",
                   help="the prototype router's distance: under the examples' shared "
                   "covariance, or cosine (default: %(default)s)")
    p.add_argument("--layer", type=int, help="block whose output is the feature (default: 2/3 "
                   "of the depth)")
    p.add_argument("--mode", choices=["top1", "softmax"], default="top1",
                   help="one task per input, or a softmax mixture (default: %(default)s)")
    p.add_argument("--temperature", type=float, help="softmax temperature (default 0.05 "
                   "prototype cosine, 1.0 otherwise)")
    p.add_argument("--max-examples", type=int, default=32,
                   help="examples used per task (default: %(default)s)")
    p.add_argument("--eval", action="append", type=_task_arg, metavar="NAME=FILE",
                   help="held-out inputs of a task: report accuracy and confusion")
    _common(p)
    p = sub.add_parser("run", help="answer texts with a task, a mixture or the router")
    p.add_argument("pack", type=Path)
    p.add_argument("--base", required=True, help="the base model directory (with tokenizer)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--task", help="task for every request ('base' for the bare base)")
    how.add_argument("--coeffs", metavar="MIX", help="mixture for every request, e.g. "
                     "'math:0.7+code:0.3'")
    how.add_argument("--auto", action="store_true", help="route with the pack's router")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", action="append", help="an input text (repeatable)")
    what.add_argument("--jsonl", type=Path, help="requests, one JSON object per line: "
                      "{\"text\", and optionally \"task\" | \"coeffs\" | \"auto\"}")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens generated for a causal LM (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="requests per forward pass (default: %(default)s)")
    p.add_argument("--mode", choices=["auto", "fused", "materialized"], default="auto",
                   help="execution path (default: %(default)s)")
    _common(p)
    p = sub.add_parser("export", help="bake a task or mixture into a model other runtimes load "
                       "(hf, peft, int8, onnx), checked against the routed model")
    p.add_argument("pack", type=Path)
    p.add_argument("--base", required=True, type=Path, help="the base model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="the task to export")
    what.add_argument("--coeffs", metavar="MIX", help="a mixture, e.g. 'math:0.7+code:0.3'")
    what.add_argument("--shared", action="store_true",
                      help="the pack's shared delta (written by merge methods)")
    p.add_argument("--out", required=True, type=Path, help="the directory to write")
    p.add_argument("--format", choices=["hf", "peft", "int8", "onnx"], default="hf",
                   help="hf: transformers model directory; peft: LoRA adapter; int8: "
                   "per-channel int8 weights + loader; onnx: for onnxruntime (default: "
                   "%(default)s)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="floating-point tensors written (default: the base's; fp32 for onnx, "
                   "int8 and peft)")
    p.add_argument("--rank", type=int, default=16, help="peft: rank of the truncated SVD of "
                   "a residual that is not low-rank (default: %(default)s)")
    p.add_argument("--max-shard-mb", type=float, default=2048,
                   help="hf: shard the weights above this size (default: %(default)s)")
    p.add_argument("--inputs", type=Path, help="texts for the check, one per line or JSONL "
                   "with \"text\" (default: built-in texts)")
    p.add_argument("--check-inputs", type=int, default=8,
                   help="inputs the check runs (default: %(default)s)")
    p.add_argument("--check-tokens", type=int, default=16,
                   help="greedy tokens per prompt for a causal LM (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="exact exports (fp32): largest error relative to the largest output "
                   "(default: %(default)s)")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help="lossy exports: top-1 / next-token agreement (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _common(p)
    p = sub.add_parser("serve", help="serve the pack over HTTP (OpenAI-compatible API): every "
                       "request names its task, requests of different tasks share a batch",
                       description="Serves one base and the pack's tasks over HTTP until "
                       "interrupted: POST /v1/completions, /v1/chat/completions (causal LMs), "
                       "/v1/classify (task heads); GET /v1/models, /health, /metrics; the "
                       "OpenAPI spec at /openapi.json. The request's `model` is a task, "
                       "'base', 'auto' (the pack's router) or a mixture 'a:0.7+b:0.3'. Tasks "
                       "added to or removed from the pack on disk are picked up without a "
                       "restart.")
    p.add_argument("pack", type=Path)
    p.add_argument("--base", required=True, type=Path,
                   help="the base model directory (with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-batch", type=int, default=32,
                   help="sequences decoded in one batch (default: %(default)s)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long an idle server waits for more requests to batch "
                   "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting before the server answers 429 (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="per-request time limit; 504 past it (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="default: %(default)s")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="largest max_tokens a request may ask (default: %(default)s)")
    p.add_argument("--mode", choices=["auto", "fused", "materialized"], default="auto",
                   help="execution path (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="load the base in this "
                   "dtype (default: as stored)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    from qmerge.demo import DTYPES

    p = sub.add_parser("demo", help="the ops on one real-sized weight, checked and timed")
    p.add_argument("--out-features", type=int, default=4096, help="default: %(default)s")
    p.add_argument("--in-features", type=int, default=4096, help="default: %(default)s")
    p.add_argument("--tasks", type=int, default=4, help="fine-tunes (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p = sub.add_parser("info", help="versions and which kernels are active")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return top


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("out_features", "in_features", "tasks", "worst", "max_examples",
                 "max_new_tokens", "batch_size", "rank", "check_inputs", "max_batch",
                 "max_queue", "max_prompt_tokens", "max_tokens", "threads"):
        if isinstance(getattr(args, name, None), int) and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        result = _run(args)
    except QmergeError as e:
        print(f"qmerge {args.verb}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qmerge {args.verb}: interrupted; nothing was changed", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
