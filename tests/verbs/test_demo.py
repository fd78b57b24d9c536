"""`qmerge demo` end to end on the real model and data, small: few fine-tuning steps and test
texts (the full run, with its quality target, is the slow test at the bottom). It checks what
the demo claims: each step ran through the public verbs, the pack is far smaller than the
fine-tunes, the export passed its check, the report and plot were written, and a second run
takes the fine-tunes from the cache."""

from __future__ import annotations

import json
import os

import pytest

from qmerge.cli import main
from qmerge.verbs.demo import data

pytest.importorskip("transformers")
if os.environ.get("QMERGE_DISABLE_EXT") == "1":
    # the demo's code is the same on either kernel path; its ops are tested on both elsewhere
    pytest.skip("run once, with the compiled kernels", allow_module_level=True)
if data.missing_data(["sentiment", "language", "noun_sense"]) and not os.environ.get("CI"):
    pytest.skip(
        "the demo's task data is not installed (scripts/install.sh)", allow_module_level=True
    )


def _demo(capsys, *args: str) -> dict:
    assert main(["demo", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_small_demo_runs_the_job_and_caches_the_finetunes(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ("--cache-dir", str(cache), "--out", str(out), "--steps", "4")
    r = _demo(capsys, *args, "--max-test", "12")
    tasks = r["tasks"]
    assert tasks == ["sentiment", "language", "noun_sense"]
    assert all(not f["cached"] for f in r["finetunes"].values())
    for setup in ("finetune", "pack_task", "pack_router", "static_merge"):
        assert set(r["accuracy"][setup]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"][setup].values())
    assert r["test_texts"] == dict.fromkeys(tasks, 12)
    assert 0.0 <= r["router_accuracy"] <= 1.0
    # 1 bit per weight (plus scales, heads, manifest) against fp32 fine-tunes
    assert r["mb_per_task"]["pack"] < r["mb_per_task"]["finetune"] / 20
    assert r["verify"]["base"] == "matches"
    assert r["export"]["passed"] and r["export"]["format"] == "int8"
    assert (out / "export-int8" / "qmerge-export.json").is_file()
    # the showcase batch mixes named tasks and router-picked rows
    asked = [b["asked"] for b in r["batch"]]
    assert "auto" in asked and set(tasks) <= set(asked)
    assert json.loads((out / "demo.json").read_text())["accuracy"] == r["accuracy"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    made = {t: (cache / "finetunes").glob(f"minilm-{t}-*") for t in tasks}
    stamps = {t: next(iter(g)).stat().st_mtime_ns for t, g in made.items()}
    again = _demo(capsys, *args, "--max-test", "4")
    assert all(f["cached"] for f in again["finetunes"].values())
    assert again["seconds"]["finetune"] < r["seconds"]["finetune"]
    for t in tasks:
        assert (
            next(iter((cache / "finetunes").glob(f"minilm-{t}-*"))).stat().st_mtime_ns
            == (stamps[t])
        )


def test_demo_refuses_unknown_tasks(capsys):
    assert main(["demo", "--tasks", "sentiment,nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown demo task 'nope'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_full_demo_meets_its_quality_target(tmp_path, capsys):
    """The README's command as it is (default cache: cold the first time, then warm): the
    routed 1-bit pack answers at >= 97% of the fine-tunes' average accuracy."""
    r = _demo(capsys, "--out", str(tmp_path / "out"))
    ft = r["accuracy"]["finetune"]
    rel = sum(r["accuracy"]["pack_task"][t] / ft[t] for t in ft) / len(ft)
    assert rel >= 0.97, r["accuracy"]
