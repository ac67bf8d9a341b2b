"""The layout algebra (passes/layout.py): a chain of views as a map into the source's index space."""
from __future__ import annotations

import math

import pytest
import torch

from attnlower.passes.layout import Layout, NotAView


def test_layout_repeat_kv_is_a_head_broadcast():
    # [B, Hkv, T, D] -> unsqueeze(2) -> expand(B, Hkv, 2, T, D) -> reshape(B, 2*Hkv, T, D)
    lay = Layout.contiguous([2, 3, 5, 7]).unsqueeze(2).expand([2, 3, 2, 5, 7]).reshape([2, 6, 5, 7])
    assert lay.clean(1) == [(3, 35), (2, 0)]   # head h reads source head h // 2
    assert lay.clean(2) == [(5, 7)] and lay.clean(3) == [(7, 1)]


def test_layout_repeat_is_not_a_group_broadcast():
    # x.repeat-like order (group outer, heads inner): head h reads h % Hkv, not a GQA group
    lay = Layout.contiguous([2, 3, 5, 7]).unsqueeze(1).expand([2, 2, 3, 5, 7]).reshape([2, 6, 5, 7])
    assert lay.clean(1) == [(2, 0), (3, 35)]


def test_layout_reshape_that_is_not_a_view_raises():
    lay = Layout.contiguous([4, 6]).transpose(0, 1)      # [6, 4] with strides (1, 6)
    assert lay.reshape([24]).clean(0) != [(24, 1)]         # flattening a transpose is no longer contiguous
    with pytest.raises(NotAView):
        Layout.contiguous([4, 6]).reshape([5, 5])


def test_layout_matches_torch_on_random_chains():
    # the algebra's index map equals torch's for a chain of views on an index tensor
    src = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)
    x = src.permute(0, 2, 1, 3).reshape(2, 4, 15).unsqueeze(1).expand(2, 2, 4, 15)
    lay = Layout.contiguous([2, 3, 4, 5]).permute([0, 2, 1, 3]).reshape([2, 4, 15]).unsqueeze(1).expand([2, 2, 4, 15])
    for idx in [(1, 0, 3, 14), (0, 1, 2, 7), (1, 1, 0, 0)]:
        flat = 0
        for k, i in enumerate(idx):
            rem = i
            subs = lay.dims[k]
            for j, (size, stride) in enumerate(subs):
                inner = math.prod(s for s, _ in subs[j + 1:])
                flat += (rem // inner) * stride
                rem = rem % inner
        assert flat == x[idx].item()


def test_layout_prefix_slice_keeps_the_memory():
    # MLA's values: kv[..., :R] of a [B, T, R + P] latent row is the same memory, R entries of the last dim
    src = torch.arange(2 * 5 * 26).view(2, 5, 26)
    lay = Layout.contiguous([2, 5, 26]).prefix(-1, 20)
    assert lay.clean(2) == [(20, 1)] and lay.clean(1) == [(5, 26)]
    view = src[..., :20]
    for idx in [(1, 4, 19), (0, 2, 7)]:
        assert view[idx].item() == sum(i * st for i, (_, st) in zip(idx, [d[0] for d in lay.dims]))
    # a prefix of a merged dim cuts its outer sub-dim when the inner extent divides it, else it is no view
    assert Layout.contiguous([4, 6]).reshape([24]).prefix(0, 12).clean(0) == [(2, 6), (6, 1)]
    with pytest.raises(NotAView):
        Layout.contiguous([4, 6]).reshape([24]).prefix(0, 10)
