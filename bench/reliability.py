"""Reliability probes (issue 30): hostile packs, hostile compress inputs, concurrent writers, a
full disk, and hostile HTTP requests, each counted by what a user would see.

    .venv/bin/python -m bench.reliability [--seed 0] [--packs 400] [--requests 600]

Writes bench/results/reliability.md: per group the inputs tried, tracebacks (an exception
escaping the CLI instead of its one-line error), hangs (no answer in 10 s), data lost (a pack
that no longer verifies, a task a successful writer added that is gone without an overwrite
after it, a refused command that wrote something), and 5xx answers (all of them, and those to
well-formed requests). Uses the tests' tiny models (tests/models.py, tests/nn/tiny.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import qmerge
from qmerge.cli import main as cli
from tests.models import base_tensors, finetune_of, save

RESULTS = Path(__file__).resolve().parent / "results"


class Hang(Exception):
    pass


def run_cli(argv: list[str], seconds: int = 10) -> str:
    """'ok', 'error' (the one-line error), 'traceback' or 'hang'."""

    def alarm(*_):
        raise Hang

    old = signal.signal(signal.SIGALRM, alarm)
    err = io.StringIO()
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli([str(a) for a in argv])
    except Hang:
        return "hang"
    except BaseException:  # noqa: BLE001 - what is being counted
        return "traceback"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    lines = err.getvalue().strip().splitlines()
    if rc == 0:
        return "ok"
    one_line = len(lines) == 1 and lines[0].startswith(f"qmerge {argv[0]}: error:")
    return "error" if rc == 1 and one_line else "traceback"


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**64, -(2**70), 10**400 // 10**380, 3])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-320, 3.0])
    if kind == 4:
        return rng.choice(["", "x", "é", "a" * 300, "../../etc/passwd"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "tasks", "files", "shape", ""]): random_json(rng, depth + 1)}


# --- packs -------------------------------------------------------------------------------


def models(root: Path) -> Path:
    b = base_tensors()
    save(b, root / "base")
    for i in range(3):
        save(finetune_of(b, i), root / f"ft{i}")
    argv = ["compress", "--base", root / "base", "--out", root / "pack", "--quiet"]
    assert run_cli([*argv, "--task", f"a={root / 'ft0'}", "--task", f"b={root / 'ft1'}"]) == "ok"
    return root / "pack"


KINDS = ["byte flips", "byte flips", "truncation", "manifest JSON", "special file", "deep JSON"]


def mutate(rng: random.Random, p: Path, i: int) -> None:
    files = sorted(f for f in p.rglob("*") if f.is_file())
    f = rng.choice(files)
    kind = i % 6
    if kind in (0, 1):  # byte flips
        raw = bytearray(f.read_bytes())
        for _ in range(rng.randrange(1, 9)):
            raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        f.write_bytes(bytes(raw))
    elif kind == 2:  # truncation
        raw = f.read_bytes()
        f.write_bytes(raw[: rng.randrange(len(raw))])
    elif kind == 3:  # a piece of the manifest replaced by arbitrary JSON
        m = json.loads((p / "manifest.json").read_text())
        node = m
        while isinstance(node, dict) and node:
            k = rng.choice(sorted(node))
            if not isinstance(node[k], dict) or rng.random() < 0.3:
                node[k] = random_json(rng)
                break
            node = node[k]
        (p / "manifest.json").write_text(json.dumps(m))
    elif kind == 4:  # special files
        t = p / "tasks" / "a.safetensors"
        t.unlink()
        special = rng.choice(["fifo", "devzero", "dir", "outside", "dangling"])
        if special == "fifo":
            os.mkfifo(t)
        elif special == "devzero":
            t.symlink_to("/dev/zero")
        elif special == "dir":
            t.mkdir()
        elif special == "outside":
            t.symlink_to(p.parent / "ft0" / "model.safetensors")
        else:
            t.symlink_to(p / "nowhere")
    else:  # deep or huge JSON
        text = "[" * 100_000 + "]" * 100_000 if rng.random() < 0.5 else '{"a": ' + "1" * 5000 + "}"
        (p / "manifest.json").write_text(text)


def pack_probes(root: Path, n: int, rng: random.Random) -> Counter:
    pack = models(root)
    out: Counter = Counter()
    for i in range(n):
        p = root / f"probe{i}"
        shutil.copytree(pack, p, symlinks=True)
        mutate(rng, p, i)
        for argv in (["verify", p, "--base", root / "base"], ["inspect", p]):
            r = run_cli(argv)
            out[r] += 1
            if argv[0] == "verify" and r == "ok":  # a change verify accepts: which kind
                out[f"verify ok after {KINDS[i % len(KINDS)]}"] += 1
        out["inputs"] += 1
        shutil.rmtree(p, ignore_errors=True)
    return out


def compress_probes(root: Path) -> Counter:
    """Hostile compress / add-task inputs: each must be the one-line error, writing nothing."""
    b = base_tensors()
    bad: dict[str, dict] = {}
    nan = finetune_of(b, 7)
    nan["model.norm.weight"][0] = float("nan")
    bad["nan"] = nan
    shape = finetune_of(b, 8)
    shape["model.norm.weight"] = shape["model.norm.weight"][:-1]
    bad["shape"] = shape
    for name, tensors in bad.items():
        save(tensors, root / name)
    (root / "garbage").mkdir()
    (root / "garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "afile").write_text("x")
    base = root / "base"
    cases = [
        ["--task", f"x={root / 'nan'}"],
        ["--task", f"x={root / 'shape'}"],
        ["--task", f"x={root / 'garbage'}"],
        ["--task", f"x={root / 'missing'}"],
        ["--task", f"base={root / 'ft0'}"],
        ["--task", f"auto={root / 'ft0'}"],
        ["--task", f"a+b={root / 'ft0'}"],
        ["--task", f"x={root / 'ft0'}", "--policy", root / "deep.json"],
        ["--task", f"x={root / 'ft0'}", "--codec", "sign:calibrate=maybe"],
        ["--task", f"x={root / 'ft0'}", "--calib-texts", root / "afile"],
        ["--task", f"x={root / 'ft0'}", "--distill-steps", "3"],
    ]
    out: Counter = Counter()
    for extra in cases:
        target = root / "never"
        out[run_cli(["compress", "--base", base, "--out", target, "--quiet", *extra])] += 1
        out["wrote something"] += target.exists()
        out["inputs"] += 1
    for extra in (["--task", f"x={root / 'ft0'}"],):  # --out under a file
        out[run_cli(["compress", "--base", base, "--out", root / "afile" / "p", *extra])] += 1
        out["inputs"] += 1
    return out


def writer_probes(root: Path, trials: int) -> Counter:
    """compress --overwrite and two add-tasks at once: the pack must verify and hold the
    overwrite's task."""
    out: Counter = Counter()
    quiet = qmerge.Options(progress=False)
    pack = root / "pack"
    for _ in range(trials):
        qmerge.compress(root / "base", {"z": root / "ft2"}, pack, opts=quiet, overwrite=True)
        jobs = [
            lambda: qmerge.compress(
                root / "base", {"a": root / "ft0"}, pack, opts=quiet, overwrite=True
            ),
            lambda: qmerge.add_task(pack, root / "base", {"b": root / "ft1"}, opts=quiet),
            lambda: qmerge.add_task(pack, root / "base", {"c": root / "ft1"}, opts=quiet),
        ]
        threads = [threading.Thread(target=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            report = qmerge.verify(pack, root / "base")
            out["data lost"] += "a" not in report["tasks"]
        except qmerge.QmergeError:
            out["data lost"] += 1
        out["inputs"] += 1
    return out


def disk_full_probe(root: Path) -> Counter:
    """compress into a 64 KiB tmpfs (root only): the one-line error, no file left."""
    out: Counter = Counter()
    mnt = root / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode:
        out["not run (cannot mount a tmpfs)"] += 1
        return out
    try:
        argv = ["compress", "--base", root / "base", "--task", f"x={root / 'ft0'}"]
        out[run_cli([*argv, "--out", mnt / "p", "--codec", "dense:dtype=fp32"])] += 1
        out["files left"] += sum(1 for _ in mnt.rglob("*"))
        out["inputs"] += 1
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    return out


# --- HTTP ---------------------------------------------------------------------------------


def hostile_bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    """(endpoint, body) of hostile requests."""

    def j(obj) -> bytes:
        return json.dumps(obj).encode()

    eps = ["/v1/completions", "/v1/chat/completions", "/v1/classify"]
    fixed = [
        (
            "/v1/completions",
            j({"model": "t0", "prompt": "the cat", "temperature": 1e-40, "top_p": 1e-300}),
        ),
        ("/v1/completions", j({"model": "t0:1e39", "prompt": "the cat"})),
        ("/v1/completions", j({"model": "t0:1e308+t0:1e308", "prompt": "the cat"})),
        ("/v1/completions", b'{"model": "t0", "prompt": "red \\udcff cat"}'),
        (
            "/v1/chat/completions",
            b'{"model": "t0", "messages": [{"role": "user", "content": "\\udcff"}]}',
        ),
        ("/v1/completions", b'{"model": "t0", "prompt": "' + b"a" * (5 << 20) + b'"}'),
        ("/v1/completions", j({"model": "t0", "prompt": "cat " * 50_000})),
        ("/v1/completions", j({"model": "nope", "prompt": "x"})),
        ("/v1/completions", b"[" * 50_000 + b"]" * 50_000),
        ("/v1/completions", b"{not json"),
    ]
    return fixed + [(rng.choice(eps), j(random_json(rng))) for _ in range(40)]


def http_probes(root: Path, n: int, rng: random.Random) -> Counter:
    import httpx

    from qmerge.serve import Limits, Server
    from tests.nn import tiny

    base, fts = tiny.llama(root / "lm", tasks=3)
    tiny.save_tokenizer(base, 64, {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2})
    pack = tiny.compress(base, fts, root / "lm" / "pack", "sign")
    hostile = hostile_bodies(rng)
    out: Counter = Counter()
    good = {"model": "t1", "prompt": "the cat sat", "max_tokens": 4, "temperature": 0}

    def one(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            if i % 3 == 0:
                r = c.post(s.url + "/v1/completions", json=good)
                out["well-formed"] += 1
                out["5xx to well-formed"] += r.status_code >= 500
            elif i % 11 == 0:  # a client that hangs up
                with contextlib.suppress(httpx.TimeoutException):
                    httpx.post(
                        s.url + "/v1/completions", json=dict(good, max_tokens=24), timeout=0.01
                    )
                out["disconnects"] += 1
                return
            else:
                ep, body = hostile[i % len(hostile)]
                r = c.post(s.url + ep, content=body, headers={"content-type": "application/json"})
            out["5xx"] += r.status_code >= 500
            out[f"status {r.status_code}"] += 1
            out["inputs"] += 1

    from concurrent.futures import ThreadPoolExecutor

    with Server(pack, base, Limits(max_tokens=24, timeout_s=30)) as s:
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(one, range(n)))
        with httpx.Client(timeout=30) as c:
            out["health ok after"] += c.get(s.url + "/health").json()["status"] == "ok"
    return out


def write(groups: dict[str, Counter], args) -> None:
    cols = ["inputs", "ok", "error", "traceback", "hang", "data lost", "wrote something", "5xx"]
    lines = [
        "# Reliability probes",
        "",
        f"Command: `.venv/bin/python -m bench.reliability --seed {args.seed} --packs "
        f"{args.packs} --requests {args.requests}`",
        "",
        f"- {time.strftime('%Y-%m-%d')}; tiny models (tests/models.py, tests/nn/tiny.py). "
        "*ok* and *error* are a verb's exit 0 and its one-line error (exit 1); a traceback is "
        "anything else; a hang is no answer in 10 s. Pack probes run `verify --base` and "
        "`inspect` on each mutated pack (byte flips, truncations, manifest pieces replaced by "
        "arbitrary JSON, FIFOs, links to /dev/zero or out of the pack, directories, deep and "
        "huge JSON).",
        "",
        "| group | " + " | ".join(cols) + " | other |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for name, c in groups.items():
        other = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in cols)
        lines.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in cols) + f" | {other} |")
    total = Counter()
    for c in groups.values():
        total.update(c)
    lines += [
        "",
        f"Totals: {total['inputs']} inputs; tracebacks {total['traceback']}, hangs "
        f"{total['hang']}, data lost {total['data lost']}, refused commands that wrote "
        f"something {total['wrote something']}, 5xx {total['5xx']} (to well-formed requests "
        f"{total['5xx to well-formed']}).",
    ]
    lines += [
        "",
        "*verify ok after manifest JSON*: edits of fields no check covers, each harmless: seen "
        "(300 edits, one at a time) were `generator` and a task's `source` or a tensor's "
        "`module_type` set to other text, and `merge` / `router` set to null where they were "
        "null. Every file's bytes, every codec table entry that decoding reads, and the base "
        "fingerprint are checked.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packs", type=int, default=400)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--writers", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    groups: dict[str, Counter] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        groups["hostile packs"] = pack_probes(root, args.packs, rng)
        groups["hostile compress inputs"] = compress_probes(root)
        groups["concurrent writers"] = writer_probes(root, args.writers)
        groups["full disk (tmpfs)"] = disk_full_probe(root)
        groups["HTTP requests"] = http_probes(root, args.requests, rng)
    write(groups, args)


if __name__ == "__main__":
    main()
