"""Task heads (classifiers with different label sets) and routers saved into the pack."""

from __future__ import annotations

import json

import pytest
import torch

import qmerge
from qmerge.errors import PackError
from qmerge.routing import LinearRouter, PrototypeRouter
from qmerge.routing.prototype import ledoit_wolf
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


def _features(dim=8, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        t: torch.randn(n, dim, generator=g) + 4 * torch.eye(dim)[k]
        for k, t in enumerate(["c0", "c1", "c2"])
    }


def test_prototype_and_linear_routers_separate_clusters():
    train, test = _features(seed=0), _features(seed=1)
    for router in (
        PrototypeRouter.fit(train, layer=2),
        PrototypeRouter.fit(train, layer=2, metric="cosine"),
        LinearRouter.fit(train, layer=2),
    ):
        for t, f in test.items():
            assert router.predict(f) == [t] * f.shape[0], router.kind
        soft = type(router).from_saved(router.config() | {"mode": "softmax"}, router.tensors())
        torch.testing.assert_close(soft.scores(test["c0"]), router.scores(test["c0"]))
        r = soft.route(test["c1"], ["c0", "c1", "c2", "extra"])
        assert torch.allclose(r.coeffs.sum(-1), torch.ones(6)) and (r.coeffs[:, 3] == 0).all()


def _overlapping(n, seed):
    """Two tasks whose inputs vary widely along shared directions, where their means differ
    too, and differ also along one direction where each task varies little (the noun/verb-gloss
    case of the benchmark): the cosine follows the wide difference, the shared covariance the
    narrow one."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in enumerate(["a", "b"]):
        x = 0.05 * torch.randn(n, 32, generator=g)
        x[:, 0] += 20.0
        x[:, 1] += 0.5 * k
        x[:, 2:8] = 1.5 * torch.randn(n, 6, generator=g)
        x[:, 2] += 1.5 * k
        out[t] = x
    return out


def _accuracy(router, test):
    return sum(p == t for t, f in test.items() for p in router.predict(f)) / 400


def test_mahalanobis_prototypes_separate_what_cosine_confuses():
    train, test = _overlapping(64, seed=0), _overlapping(200, seed=1)
    shared = PrototypeRouter.fit(train, layer=1)
    assert shared.metric == "mahalanobis" and shared.temperature == 1.0
    cosine = PrototypeRouter.fit(train, layer=1, metric="cosine")
    assert cosine.temperature == 0.05
    assert _accuracy(shared, test) >= 0.97
    assert _accuracy(cosine, test) <= 0.8  # the wide shared directions swamp the cosine


def test_prototype_router_edge_cases():
    # the Ledoit-Wolf weight: small for a well-estimated skewed covariance, large for few rows
    g = torch.Generator().manual_seed(0)
    skewed = torch.randn(4000, 8, generator=g, dtype=torch.float64) * torch.arange(1.0, 9.0)
    skewed -= skewed.mean(0)
    assert ledoit_wolf(skewed, skewed.T @ skewed / 4000) < 0.01
    few = skewed[:4] - skewed[:4].mean(0)
    assert ledoit_wolf(few, few.T @ few / 4) > 0.3
    # one example per task: no spread to estimate a covariance from; nearest mean still works
    one = {t: f[:1] for t, f in _features().items()}
    router = PrototypeRouter.fit(one, layer=1)
    assert router.predict(torch.cat(list(one.values()))) == list(one)
    # routers saved before metrics existed are cosine routers
    cosine = PrototypeRouter.fit(_features(), layer=1, metric="cosine")
    config = {k: v for k, v in cosine.config().items() if k != "metric"}
    assert PrototypeRouter.from_saved(config, cosine.tensors()).metric == "cosine"
    # a mahalanobis router needs its bias; a bad metric or shrinkage is named
    shared = PrototypeRouter.fit(_features(), layer=1)
    tensors = {k: v for k, v in shared.tensors().items() if k != "bias"}
    with pytest.raises(qmerge.errors.ConfigError, match="'bias' is missing"):
        PrototypeRouter.from_saved(shared.config(), tensors)
    with pytest.raises(qmerge.errors.ConfigError, match="metric must be one of"):
        PrototypeRouter.fit(_features(), layer=1, metric="euclid")
    with pytest.raises(qmerge.errors.ConfigError, match="shrinkage must be in"):
        PrototypeRouter.fit(_features(), layer=1, shrinkage=1.5)


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


def test_ledoit_wolf_weight_equals_scikit_learns():
    covariance = pytest.importorskip("sklearn.covariance")
    g = torch.Generator().manual_seed(0)
    for n, d in ((10, 30), (200, 16), (50, 50)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(
            0.1, 3, d, dtype=torch.float64
        )
        x -= x.mean(0)
        want = covariance.ledoit_wolf_shrinkage(x.numpy(), assume_centered=True)
        assert ledoit_wolf(x, x.T @ x / n) == pytest.approx(want, rel=1e-9)
