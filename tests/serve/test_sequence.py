"""Released text of a generation (stop strings, partial characters) and greedy tokens, without
a model."""

from __future__ import annotations

import pytest
import torch

from qmerge.serve.sequence import Sampling, Sequence, _held, choose, greedy_rows

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\ufffd", 6: "é", 9: "<eos>"}


def _seq(stop=(), max_tokens=10) -> Sequence:
    return Sequence(
        [7, 8],
        "t",
        Sampling(max_tokens, 0.0, stop=tuple(stop)),
        frozenset({9}),
        lambda ids: "".join(PIECES[i] for i in ids if i != 5 or ids[-1] == 5),
        limit=100,
    )


def _logits(tok: int) -> torch.Tensor:
    x = torch.zeros(10)
    x[tok] = 1
    return x


def test_text_is_released_once_and_a_stop_string_is_held_back_then_cut():
    s = _seq(stop=["wor"])
    assert s.push(_logits(1)) == "Hel"
    assert s.push(_logits(2)) == "lo"
    # " wor" contains the stop string: the text ends before it
    assert s.push(_logits(3)) == " "
    assert s.finish == "stop" and s.text == "Hello "
    s = _seq(stop=["low"])
    assert s.push(_logits(1)) == "He"  # "l" could start "low": held back
    assert s.push(_logits(2)) == "l"  # "Hello": its "lo" could still become "low"
    assert s.push(_logits(3)) == "lo wor"
    assert s.finish is None and s.text == "Hello wor"


def test_partial_character_is_held_and_eos_and_length_finish():
    s = _seq()
    assert s.push(_logits(1)) == "Hel"
    assert s.push(_logits(5)) == ""  # ends in U+FFFD: not final yet
    assert s.push(_logits(6)) == "é"
    assert s.push(_logits(9)) == "" and s.finish == "stop" and s.tokens == [1, 5, 6]
    s = _seq(max_tokens=2)
    s.push(_logits(1))
    assert s.push(_logits(2)) == "lo" and s.finish == "length"


def test_held_and_sampling():
    assert _held("abcde", ("def",)) == 2 and _held("abc", ("x",)) == 0
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert choose(x, Sampling(temperature=0), None) == 1
    # top_p keeps the smallest set reaching p: here only the two near-equal tokens
    got = {choose(x, Sampling(temperature=1, top_p=0.9), g) for _ in range(200)}
    assert got == {1, 2}


@pytest.mark.parametrize(
    "temperature, top_p", [(1e-40, 1.0), (1e-320, 1.0), (1.0, 1e-300), (1e-40, 1e-300)]
)
def test_hostile_sampling_values_pick_a_token_without_raising(temperature, top_p):
    """Issue 30, 3: a tiny temperature or nucleus is its greedy limit, not a NaN that makes
    multinomial raise for the whole batch."""
    logits = torch.tensor([1.0, 5.0, 3.0, 5.0 - 1e-3])
    s = Sampling(temperature=temperature, top_p=top_p, seed=0)
    assert choose(logits, s, s.generator()) == 1


def test_non_finite_logits_never_pick_a_nan():
    s = Sampling(temperature=0.7, seed=0)
    logits = torch.tensor([float("nan"), 2.0, float("nan"), 1.0])
    for _ in range(20):
        assert choose(logits, s, s.generator()) in (1, 3)
    assert choose(torch.full((3,), float("nan")), s, s.generator()) in (0, 1, 2)


def test_greedy_rows_is_choose_at_temperature_zero_row_by_row():
    """The scheduler takes a batch's greedy tokens in one pass: each equals `choose`'s, with
    NaNs, infinities, ties (the first wins) and an all-NaN row."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [
            [nan, 2.0, nan, 1.0],
            [1.0, 3.0, 3.0, -inf],
            [nan, nan, nan, nan],
            [-inf, -inf, 0.5, inf],
        ]
    )
    logits = torch.cat([logits, torch.randn(12, 4).bfloat16().float()])
    got = greedy_rows(logits)
    assert got == [choose(row, Sampling(temperature=0), None) for row in logits]
    assert got[:4] == [1, 1, 0, 3]
    s = _seq()
    s.push(_logits(1), greedy=2)  # at temperature 0 the batch's argmax is taken as given
    assert s.tokens == [2]
