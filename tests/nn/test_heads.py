"""Task heads (classifiers with different label sets) and routers saved into the pack."""

from __future__ import annotations

import json

import pytest
import torch

import qmerge
from qmerge.errors import PackError
from qmerge.verbs import router_store as store
from tests.nn import tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base, fts = tiny.bert(root)
    pack = tiny.compress(base, fts, root / "pack", tiny.EXACT, heads=("classifier.*",))
    return root, base, fts, pack


IDS = torch.tensor(
    [[2, 14, 33, 50, 7, 3], [2, 60, 61, 62, 4, 3], [2, 9, 9, 9, 9, 3], [2, 70, 5, 41, 8, 3]]
)


def test_heads_are_stored_with_labels_and_verified(cls):
    root, base, fts, pack = cls
    m = json.loads((pack / "manifest.json").read_text())
    assert set(m["tasks"]["c1"]["heads"]) == {"classifier.weight", "classifier.bias"}
    assert m["tasks"]["c1"]["labels"] == [f"label{k}" for k in range(5)]
    assert "bert.embeddings.word_embeddings.weight" not in m["tasks"]["c1"]["tensors"]
    assert "embeddings.word_embeddings.weight" in m["tasks"]["c1"]["tensors"]
    assert qmerge.verify(pack, base=base)["base"] == "matches"


def test_mixed_batch_of_classifiers_equals_each_fine_tune(cls):
    root, base, fts, pack = cls
    model = qmerge.load(base, pack)
    assert type(model).__name__ == "BertForSequenceClassification"
    route = ["c1", "c0", "c2", "c1"]
    with torch.no_grad():
        logits = model(input_ids=IDS, task=route).logits
        assert logits.shape == (4, 5)
        for i, t in enumerate(route):
            ref = (
                transformers.AutoModelForSequenceClassification.from_pretrained(fts[t])
                .eval()(input_ids=IDS[i : i + 1])
                .logits[0]
            )
            n = ref.shape[0]
            torch.testing.assert_close(logits[i, :n], ref, rtol=1e-5, atol=1e-5)
            assert (logits[i, n:] == torch.finfo(logits.dtype).min).all()
    assert model.qmerge.labels("c2") == ["label0", "label1"]


def test_grouping_a_mixed_batch_by_task_changes_nothing(cls):
    """An encoder's mixed batch runs with each task's sequences side by side; every output
    (logits, hidden states) comes back in the caller's order."""
    root, base, fts, pack = cls
    model = qmerge.load(base, pack, mode="fused")
    route = ["c2", "c0", "c2", "c1"]
    assert model.qmerge._task_order(
        qmerge.routing.resolve(model.qmerge.tasks, 4, route), {}
    ).tolist() == [1, 3, 0, 2]
    with torch.no_grad():
        grouped = model(input_ids=IDS, task=route, output_hidden_states=True)
        model.qmerge.runtime.sort_batches = False
        plain = model(input_ids=IDS, task=route, output_hidden_states=True)
    torch.testing.assert_close(grouped.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped.hidden_states, plain.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_router_saved_into_the_pack_routes_a_forward(cls, tmp_path):
    root, base, fts, pack = cls
    import shutil

    local = tmp_path / "pack"
    shutil.copytree(pack, local)
    model = qmerge.load(base, local)
    examples = {
        "c0": [{"input_ids": IDS[:1]}],
        "c1": [{"input_ids": IDS[1:2]}],
        "c2": [{"input_ids": IDS[2:3]}],
    }
    router = qmerge.fit_router(model, examples, layer=2)
    assert router.layer == 2
    assert qmerge.verify(local)["files_checked"] == 4  # 3 tasks + router.safetensors
    again = qmerge.load(base, local)
    assert again.qmerge.router is not None and again.qmerge.router.tasks == ["c0", "c1", "c2"]
    with torch.no_grad():
        auto = again(input_ids=IDS[:3], router=True).logits
        named = again(input_ids=IDS[:3], task=["c0", "c1", "c2"]).logits
    torch.testing.assert_close(auto, named)  # each example routes to the task it defined
    # the router costs a partial base forward: features stop at the router's layer
    f = again.qmerge.features({"input_ids": IDS}, layer=2)
    assert f.shape == (4, 32)
    # removing a task leaves the router usable for the rest
    qmerge.remove_task(local, ["c2"])
    left = qmerge.load(base, local)
    with torch.no_grad():
        y = left(input_ids=IDS[2:3], router=True)
    assert y.logits.shape[0] == 1


def test_a_damaged_router_entry_is_refused(cls, tmp_path):
    root, base, fts, pack = cls
    import shutil

    local = tmp_path / "pack"
    shutil.copytree(pack, local)
    model = qmerge.load(base, local)
    qmerge.fit_router(
        model, {"c0": [{"input_ids": IDS[:1]}], "c1": [{"input_ids": IDS[1:2]}]}, layer=1
    )
    m = json.loads((local / "manifest.json").read_text())
    m["router"]["mode"] = "bogus"
    (local / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match="router.mode"):
        store.load(qmerge.open_pack(local))
