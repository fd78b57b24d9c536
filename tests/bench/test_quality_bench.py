"""The quality benchmark (bench/quality) end to end on tiny models and synthetic tasks: both
tracks' setups, the static merges' sweeps and the report. The real run (real models, real data,
hours of CPU) is bench/quality/run.py; this checks its code paths in seconds."""

# ruff: noqa: E402  (the benchmark's modules import after the skips: they need transformers
# and matplotlib)
from __future__ import annotations

import os
import random

import pytest
import torch

from tests.nn import tiny

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
if os.environ.get("QMERGE_DISABLE_EXT") == "1":
    # the benchmark's code is the same on either kernel path, and this file costs ~1 min
    pytest.skip("run once, with the compiled kernels", allow_module_level=True)
from bench.quality import lm as lm_track
from bench.quality import measure
from bench.quality import minilm as minilm_track
from bench.quality import run as quality
from qmerge.verbs.demo.data import Task


def _tasks(labels: dict[str, list[str]], n_train=24, n_test=14) -> dict[str, Task]:
    rng = random.Random(0)
    out = {}

    def example(n_labels):
        return " ".join(rng.choice(tiny.WORDS) for _ in range(6)), rng.randrange(n_labels)

    for name, names in labels.items():
        out[name] = Task(
            name,
            names,
            [example(len(names)) for _ in range(n_train)],
            [example(len(names)) for _ in range(n_test)],
        )
    return out


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality-bert")
    base, fts = tiny.bert(root)
    tiny.save_tokenizer(base, 80, {"[PAD]": 0, "[UNK]": 1})
    for d in fts.values():
        tiny.save_tokenizer(d, 80, {"[PAD]": 0, "[UNK]": 1})
    tasks = _tasks(
        {t: [f"label{k}" for k in range(n)] for t, n in zip(fts, (3, 5, 2), strict=True)}
    )
    return base, fts, tasks, root


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality-llama")
    base, fts = tiny.llama(root)
    specials = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for d in (base, *fts.values()):
        tiny.save_tokenizer(d, 64, specials)
    tasks = _tasks({t: ["cat", "dog", "red"] for t in fts})
    return base, fts, tasks, root


SETUPS = [
    "base + head (floor)",
    "individual fine-tunes",
    "EMR (unified + 1-bit masks), oracle ids",
    "routed sign calibrated, oracle ids",
    "routed sign calibrated, prototype router",
    "routed sign calibrated, prototype router (cosine)",
    "routed low-rank r=32, oracle ids",
    "Twin (TIES shared + 1-bit exclusive), prototype router",
    "routed auto (SQNR 6 dB), oracle ids",
]


def _check_rows(rows, sweeps, floor):
    names = [r["setup"] for r in rows]
    for want in [floor, *SETUPS[1:]]:
        assert want in names
    statics = [r for r in rows if r["group"] == "static merge"]
    assert len(statics) == 4 and all("tuned" in r["setup"] for r in statics)
    by = {r["setup"]: r for r in rows}
    ceiling = by["individual fine-tunes"]
    assert all(n == (1.0 if ceiling["task_acc"][t] else 0.0) for t, n in ceiling["norm"].items())
    for r in rows:
        assert all(0.0 <= a <= 1.0 for a in r["task_acc"].values()), r["setup"]
    # 1 bit per weight plus a 16-bit scale per row of 32-wide tiny matrices
    assert 1.0 < by["routed sign calibrated, oracle ids"]["linear_bits"] < 1.6
    assert 0.0 < by["routed low-rank r=32, oracle ids"]["linear_bits"]
    for s in sweeps.values():
        assert set(s) == {"task_arithmetic", "ties", "dare", "lines"}
        for m in s.values():
            assert float(m["best"]) in {float(v) for v in m["curve"]}


def _short(track):
    track.sweeps = {m: (knob, grid[:2], paper) for m, (knob, grid, paper) in track.sweeps.items()}
    return track


def test_both_tracks_and_the_report(minilm, llm, tmp_path):
    logs = []
    base, fts, tasks, root = minilm

    def mk(seed):
        track = minilm_track.MiniLM(
            base, fts, tasks, root / f"s{seed}", seed, 8, n_val=4, router_examples=8
        )
        return _short(track), minilm_track.setups

    rows, sweeps = quality.run_seeds(mk, [0], tmp_path / "rows", logs.append)
    _check_rows(rows, sweeps, "base + head (floor)")
    assert (tmp_path / "rows" / "0.json").is_file()  # a seed's rows are cached for --reuse
    again = quality.run_seeds(mk, [0], tmp_path / "rows", logs.append)
    assert again[0] == rows and any("rows from" in m for m in logs)

    lbase, lfts, ltasks, lroot = llm

    def mk_lm(seed):
        track = lm_track.LM(lbase, lfts, ltasks, lroot / "lm", seed, 8, n_val=4, router_examples=8)
        return _short(track), lm_track.setups

    lm_rows, lm_sweeps = quality.run_seeds(mk_lm, [0], None, logs.append)
    _check_rows(lm_rows, lm_sweeps, "base (floor)")

    out = tmp_path / "quality.md"
    quality.write_report(
        out, "python -m bench.quality.run --smoke", "- meta", (rows, sweeps), (lm_rows, lm_sweeps)
    )
    text = out.read_text()
    assert "Command: `python -m bench.quality.run --smoke`" in text
    assert "## Targets" in text and "## LLM track" in text and "Static-merge sweeps" in text
    assert text.count("| routed sign calibrated, oracle ids |") == 2
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert out.with_suffix(".json").is_file()


def test_teacher_forced_exact_match_is_greedy_decoding(llm, tmp_path):
    """lm.LM.matches reads greedy exact match off one forward: check it against generate."""
    base, fts, tasks, root = llm
    track = lm_track.LM(base, fts, tasks, tmp_path, 0, 8, n_val=4, router_examples=8)
    model = track.finetuned("t1")
    torch.manual_seed(0)
    agree = matched = 0
    for ids, mask, starts, answers in track.batches("t1"):
        logits = model(input_ids=ids, attention_mask=mask).logits
        for k, (s, a) in enumerate(zip(starts, answers, strict=True)):
            # the model's own greedy answer, and the test's answer: both must be judged right
            gen = model.generate(
                ids[k : k + 1, :s],
                max_new_tokens=len(a),
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )[0, s:].tolist()
            own = ids[k : k + 1].clone()
            own[0, s : s + len(gen)] = torch.tensor(gen)
            assert track.matches(model(input_ids=own[:, : s + len(gen)]).logits, [s], [gen]) == 1
            forced = track.matches(logits[k : k + 1], [s], [a])
            assert forced == int(gen == a)
            agree += 1
            matched += forced
    assert agree == 8


def test_a_merge_tuned_differently_per_seed_names_every_value():
    names = ["TIES (k=20%) (λ=0.5, tuned)", "TIES (k=20%) (λ=0.8, tuned)"]
    assert quality._merge_names(names) == "TIES (k=20%) (λ=0.5 / 0.8, tuned)"
    assert quality._merge_names(names[:1] * 3) == names[0]


def test_a_choice_at_an_end_of_the_grid_is_flagged():
    curve = {"0.3": 0.35, "0.5": 0.37, "1.5": 0.30}
    assert quality._chosen({"best": 0.5, "curve": curve}) == "0.5"
    assert quality._chosen({"best": 1.5, "curve": curve}) == "1.5, an end of the grid"
    assert quality._chosen({"best": 0.3, "curve": curve}) == "0.3, an end of the grid"


def test_the_held_out_split_shares_the_test_splits_class_mix():
    # hash order under a per-class cap: two classes at random, then the common one runs out
    # and the tail is all the rare class
    rng = random.Random(0)
    examples = [(f"x{i}", int(rng.random() < 0.5)) for i in range(300)] + [
        (f"y{i}", 1) for i in range(200)
    ]
    test, val = measure.held_out(examples, 200, 80)
    assert len(test) == 200 and len(val) == 80
    assert not {x for x, _ in test} & {x for x, _ in val}
    share = [sum(y for _, y in split) / len(split) for split in (test, val)]
    assert abs(share[0] - share[1]) < 0.1, share  # the tail split gave the held-out 100%
    with pytest.raises(SystemExit, match="need more than 80"):
        measure.held_out(examples[:80], 200, 80, "tiny")


def test_plot_labels_are_short_and_keep_setups_apart():
    names = [
        "routed sign calibrated, prototype router",
        "routed sign calibrated, prototype router (cosine)",
        "Twin (TIES shared + 1-bit exclusive), oracle ids",
        "TIES (k=20%) (λ=0.8 / 0.5 / 0.8, tuned)",
    ]
    labels = [quality._short(n) for n in names]
    assert labels == [
        "sign cal., proto",
        "sign cal., proto cosine",
        "Twin (TIES + 1-bit), oracle",
        "TIES (k=20%)",
    ]
