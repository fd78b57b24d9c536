"""The batch KV cache: join/select keep rows right-aligned, and decoding steps append in place
into buffers with room, equal to transformers' own concatenating layers."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, MistralConfig

from qmerge.serve.kv import KV, ROOM, _Growing


def _kv(lens, length, fill, layers=1, heads=2, dim=4):
    keys = []
    for _ in range(layers):
        k = torch.zeros(len(lens), heads, length, dim)
        for b, n in enumerate(lens):
            k[b, :, length - n :] = fill + b
        keys.append(k)
    return KV(keys, [k.clone() + 0.5 for k in keys], torch.tensor(lens))


def _config(cls=LlamaConfig, **kw):
    return cls(
        num_hidden_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=16,
        vocab_size=32,
        **kw,
    )


def test_kv_join_and_select_keep_each_row_right_aligned():
    a, b = _kv([3, 1], 3, 10), _kv([5], 5, 20)
    j = a.join(b)
    assert j.length == 5 and j.lens.tolist() == [3, 1, 5]
    assert j.mask().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(j.keys[0][0, :, 2:], a.keys[0][0])
    s = j.select([0, 1])  # the longest row left: two padding columns go
    assert s.length == 3 and torch.equal(s.keys[0], a.keys[0])
    assert s.mask(1).tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_steps_write_in_place_and_equal_concatenation():
    """Many steps past the room: every layer's keys and values equal `torch.cat` of the new
    columns; the buffers are reallocated only when their room runs out, and a step leaves
    the batch it started from as it was."""
    torch.manual_seed(0)
    cfg = _config()
    kv = _kv([3, 1], 3, 10, layers=2)
    ref_k, ref_v = list(kv.keys), list(kv.values)
    grown = 0
    for step in range(2 * ROOM + 5):
        before = [k.clone() for k in kv.keys]
        ptrs = [b.data_ptr() for b in kv._kbuf or kv.keys]
        cache = kv.to_cache(cfg)
        assert all(isinstance(layer, _Growing) for layer in cache.layers)
        for i, layer in enumerate(cache.layers):
            nk, nv = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
            k, v = layer.update(nk, nv)
            ref_k[i], ref_v[i] = torch.cat([ref_k[i], nk], 2), torch.cat([ref_v[i], nv], 2)
            assert torch.equal(k, ref_k[i]) and torch.equal(v, ref_v[i])
        assert all(torch.equal(k, b) for k, b in zip(kv.keys, before, strict=True))
        new = KV.from_cache(cache, kv.lens + 1)
        grown += new._kbuf[0].data_ptr() != ptrs[0]
        assert new.length == 3 + step + 1 and new.nbytes() >= 2 * 2 * new.keys[0].nbytes
        kv = new
    # once at the first step (the batch came exact-sized), then each time the room ran out
    assert 2 <= grown <= 4, grown
    s = kv.select([1])
    assert torch.equal(s.keys[1], ref_k[1][1:, :, -s.length :])


def test_sliding_window_layers_keep_the_library_layer():
    cfg = _config(MistralConfig, sliding_window=4)
    kv = _kv([3, 2], 3, 1, layers=2)
    cache = kv.to_cache(cfg)
    assert not any(isinstance(layer, _Growing) for layer in cache.layers)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, kv.keys, strict=True))
