"""The CLI's verbs run end to end (small shapes) and report honest checks."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qmerge", *args], capture_output=True, text=True)


def test_ops_demo_json_small():
    out = run(
        "demo",
        "--ops",
        "--out-features",
        "96",
        "--in-features",
        "100",
        "--ops-tasks",
        "3",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["dequant_equals_reference"] is True
    assert result["sign_linear_max_rel_error"] < 1e-2
    assert 1.0 < result["bits_per_param"] < 1.5  # 1 bit + a 32-bit scale per 100-wide row
    assert result["weight_sqnr_db"] > result["task_vector_sqnr_db"]


def test_info_and_help():
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    assert "backend" in json.loads(out.stdout)
    assert "demo" in run("--help").stdout


def test_bad_argument_is_a_clear_error():
    out = run("demo", "--steps", "0")
    assert out.returncode == 2 and "--steps: must be >= 1" in out.stderr
