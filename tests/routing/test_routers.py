"""Routers over feature vectors: prototype (Mahalanobis and cosine) and linear, fitted, saved
and read back, and the Ledoit-Wolf shrinkage against scikit-learn's."""

from __future__ import annotations

import pytest
import torch

import qmerge
from qmerge.routing import LinearRouter, PrototypeRouter
from qmerge.routing.prototype import ledoit_wolf


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
