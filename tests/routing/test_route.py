"""Route resolution: what callers write -> per-row coefficients, and its refusals."""

import pytest
import torch

from qmerge.errors import ConfigError, UnknownTask
from qmerge.routing import parse_mixture, resolve
from qmerge.routing.route import coefficients, parse_route

TASKS = ("math", "code", "chat")


def test_names_per_sequence_and_base():
    r = resolve(TASKS, 3, task=["code", "base", "math"])
    assert r.task_ids.tolist() == [1, -1, 0]
    assert r.names() == ["code", "base", "math"]
    assert r.uniform() is None and not r.is_base()
    assert r.used() == [0, 1]


def test_one_name_is_uniform_and_default_is_base():
    r = resolve(TASKS, 4, task="chat")
    assert r.uniform().tolist() == [0, 0, 1]
    assert resolve(TASKS, 2).is_base()


def test_mixtures_from_text_dict_and_tensor():
    a = resolve(TASKS, 2, coeffs="math:0.7+code:0.3")
    b = resolve(TASKS, 2, coeffs={"math": 0.7, "code": 0.3})
    c = resolve(TASKS, 2, coeffs=torch.tensor([0.7, 0.3, 0.0]))
    for r in (a, b, c):
        assert torch.allclose(r.coeffs, torch.tensor([[0.7, 0.3, 0.0]] * 2))
    assert a.names() == ["math:0.7+code:0.3"] * 2
    per_row = resolve(TASKS, 2, coeffs=["chat", None])
    assert per_row.coeffs.tolist() == [[0, 0, 1], [0, 0, 0]]
    assert parse_mixture("code", TASKS) == {"code": 1.0}


def test_per_token_coeffs_and_expansion():
    r = resolve(TASKS, 2, coeffs=torch.zeros(2, 5, 3))
    assert r.per_token
    ids = resolve(TASKS, 2, task=["math", "chat"]).expand(6)
    assert ids.task_ids.tolist() == [0, 0, 0, 2, 2, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"task": ["math"]}, "lists 1 tasks for a batch of 2"),
        ({"task": 7}, "out of range"),
        ({"coeffs": "math:x"}, "weight 'x' of 'math' is not a number"),
        ({"coeffs": "math:inf"}, "not finite"),
        ({"coeffs": torch.ones(2, 4)}, r"\[B, T\]"),
        ({"coeffs": torch.tensor([float("nan"), 0, 0])}, "NaN"),
        ({"task": "math", "coeffs": "code"}, "not both"),
    ],
)
def test_refusals_name_the_problem(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve(TASKS, 2, **kwargs)


def test_expand_refuses_a_batch_that_is_not_a_multiple():
    with pytest.raises(ConfigError, match="5 sequences but 2 were routed"):
        resolve(TASKS, 2, task="math").expand(5)


def test_one_grammar_reads_a_route_once():
    assert parse_route("base", TASKS) == "base" and parse_route("code", TASKS) == "code"
    assert parse_route("math:0.7+code:0.3", TASKS) == {"math": 0.7, "code": 0.3}
    assert parse_route({"math": 1, "base": 2}, TASKS) == {"math": 1.0}
    assert parse_route("auto", TASKS, router=True) == "auto"
    with pytest.raises(ConfigError, match="has none"):
        parse_route("auto", TASKS)
    for text in ("nope", "math:0.5+nope:0.5"):
        with pytest.raises(UnknownTask) as e:
            parse_route(text, TASKS)
        assert e.value.name == "nope"
    with pytest.raises(ConfigError, match="finite"):
        parse_route({"math": float("nan")}, TASKS)
    c = coefficients(["base", "chat", {"math": 0.25}], TASKS)
    assert c.tolist() == [[0, 0, 0], [0, 0, 1], [0.25, 0, 0]]


@pytest.mark.parametrize(
    "spec", ["a:1e308+a:1e308", "a:1e39", {"a": 1e39}, {"a": -1001.0}, "a:600+a:600"]
)
def test_mixture_weights_past_the_bound_are_refused(spec):
    """Issue 30, 3 and 7: a weight that overflows activations is a client error."""
    with pytest.raises(ConfigError, match="weights are at most 1000"):
        parse_route(spec, ["a", "b"])
