"""PagedKVCache: block allocation, writes across block boundaries, gather, and the paged op over it."""
import pytest
import torch
import torch.nn.functional as F

import attnlower.ops as public
from attnlower.cache import CacheFullError, PagedKVCache
from attnlower.lowering.params import AttentionParams
from attnlower.lowering.reference import reference_paged_forward

HKV, D, BLOCK = 2, 8, 4


def make_cache(num_blocks=16, **kwargs):
    return PagedKVCache(num_blocks, BLOCK, HKV, D, dtype=torch.float32, **kwargs)


def tokens(t, b=1):
    return torch.randn(b, HKV, t, D), torch.randn(b, HKV, t, D)


def test_append_across_block_boundaries_and_gather():
    cache = make_cache()
    seq = cache.add_sequence()
    written_k, written_v = [], []
    for t in (3, 5, 1, 4):  # 3 | 1+4 | 4 | 1+3 ... crosses every kind of boundary
        k, v = tokens(t)
        cache.append(seq, k, v)
        written_k.append(k)
        written_v.append(v)
    assert cache.seq_len(seq) == 13
    assert len(cache.blocks_of(seq)) == 4 and cache.num_free_blocks == 12
    keys, values = cache.gather([seq])
    assert torch.equal(keys, torch.cat(written_k, dim=2))
    assert torch.equal(values, torch.cat(written_v, dim=2))
    # token t sits at slot t % block_size of block t // block_size
    blocks = cache.blocks_of(seq)
    for t in (0, 3, 4, 12):
        assert torch.equal(cache.k_pool[blocks[t // BLOCK], :, t % BLOCK], keys[0, :, t])


def test_interleaved_sequences_get_non_contiguous_blocks():
    cache = make_cache(num_blocks=12)  # 9 blocks used below: d must reuse b's freed blocks
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    history = {a: [], b: [], c: []}
    for step in range(4):
        for seq in (a, b, c):
            k, v = tokens(3)
            cache.append(seq, k, v)
            history[seq].append((k, v))
    blocks_a, blocks_b = cache.blocks_of(a), cache.blocks_of(b)
    assert blocks_a != list(range(blocks_a[0], blocks_a[0] + len(blocks_a)))  # interleaved growth
    cache.free_sequence(b)  # its blocks go back to the free list and get reused out of order
    d = cache.add_sequence()
    history[d] = []
    k, v = tokens(14)
    cache.append(d, k, v)
    history[d].append((k, v))
    blocks_d = cache.blocks_of(d)
    assert blocks_d[-1] in blocks_b and blocks_d != list(range(blocks_d[0], blocks_d[0] + 4))
    owned = [blk for seq in (a, c, d) for blk in cache.blocks_of(seq)]
    assert len(owned) == len(set(owned))  # no block shared
    batch = [d, a, c]
    keys, values = cache.gather(batch)
    lens = cache.seq_lens(batch)
    assert lens.dtype == torch.int32 and lens.tolist() == [14, 12, 12]
    for row, seq in enumerate(batch):
        want_k = torch.cat([k for k, _ in history[seq]], dim=2)[0]
        want_v = torch.cat([v for _, v in history[seq]], dim=2)[0]
        length = want_k.shape[1]
        assert torch.equal(keys[row, :, :length], want_k) and torch.equal(values[row, :, :length], want_v)
        assert torch.equal(keys[row, :, length:], torch.zeros_like(keys[row, :, length:]))
    table = cache.block_table(batch)
    assert table.dtype == torch.int32 and table.shape == (3, 4)
    assert table[0].tolist() == blocks_d and table[1, :3].tolist() == cache.blocks_of(a)
    assert table[1, 3] == 0  # padding


def test_batched_append_and_fixed_width_table():
    cache = make_cache()
    ids = [cache.add_sequence() for _ in range(3)]
    k, v = tokens(6, b=3)
    cache.append(ids, k, v)
    keys, values = cache.gather(ids)
    assert torch.equal(keys, k) and torch.equal(values, v)
    table = cache.block_table(ids, max_blocks=5)
    assert table.shape == (3, 5) and (table[:, 2:] == 0).all()
    with pytest.raises(ValueError, match=r"max_blocks >= 2 .*got 1"):
        cache.block_table(ids, max_blocks=1)


@pytest.mark.parametrize("tq,window", [(1, 0), (3, 0), (2, 5)])
def test_paged_reference_over_cache_equals_dense_attention(tq, window):
    cache = make_cache(num_blocks=24)
    ids = [cache.add_sequence() for _ in range(3)]
    for lengths in ((5, 2, 9), (4, 7, 1)):  # ragged lengths through per-sequence appends
        for seq, t in zip(ids, lengths):
            cache.append(seq, *tokens(t))
    q = torch.randn(3, 4, tq, D)  # GQA: 4 query heads on 2 KV heads
    lens = cache.seq_lens(ids)
    out = reference_paged_forward(q, cache.k_pool, cache.v_pool, cache.block_table(ids), lens,
                                  AttentionParams(0.35, True, window=window))
    keys, values = cache.gather(ids)
    for b, length in enumerate(lens.tolist()):
        pos = torch.arange(length - tq, length).view(-1, 1)
        t = torch.arange(length).view(1, -1)
        mask = t <= pos
        if window:
            mask &= t > pos - window
        want = F.scaled_dot_product_attention(
            q[b:b + 1], keys[b:b + 1, :, :length].repeat_interleave(2, 1),
            values[b:b + 1, :, :length].repeat_interleave(2, 1), attn_mask=mask, scale=0.35)
        torch.testing.assert_close(out[b:b + 1], want, atol=2e-5, rtol=1e-5)
    # the public op reads the pools directly
    torch.testing.assert_close(
        public.paged_attention(q, cache.k_pool, cache.v_pool, cache.block_table(ids), lens,
                               scale=0.35, window=window), out)


def test_full_pool_raises_and_leaves_state_unchanged():
    cache = make_cache(num_blocks=3)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(a, *tokens(7))  # 2 blocks
    before = cache.k_pool.clone()
    with pytest.raises(CacheFullError, match=r"need 2 more blocks .*only 1 of 3 are free"):
        cache.append([a, b], *tokens(2, b=2))  # a fits in its block, b needs 1, a needs 1 more
    assert cache.seq_len(a) == 7 and cache.seq_len(b) == 0 and cache.num_free_blocks == 1
    assert torch.equal(cache.k_pool, before)
    cache.free_sequence(a)
    cache.append(b, *tokens(12))  # fits once a is freed
    assert cache.seq_len(b) == 12


def test_fork_copies_into_blocks_of_its_own_and_the_two_grow_apart():
    cache = make_cache(num_blocks=8)
    a = cache.add_sequence()
    cache.append(a, *tokens(6))                      # 2 blocks, the second half full
    b = cache.fork(a)
    assert cache.seq_len(b) == 6 and cache.num_free_blocks == 4
    assert not set(cache.blocks_of(a)) & set(cache.blocks_of(b))
    keys_a, values_a = cache.gather([a])
    keys_b, values_b = cache.gather([b])
    assert torch.equal(keys_a, keys_b) and torch.equal(values_a, values_b)
    k_a, v_a = tokens(3)
    k_b, v_b = tokens(3)
    cache.append([a, b], torch.cat([k_a, k_b]), torch.cat([v_a, v_b]))   # the shared half block diverges
    keys, values = cache.gather([a, b])
    assert torch.equal(keys[0, :, :6], keys[1, :, :6]) and torch.equal(values[0, :, :6], values[1, :, :6])
    assert torch.equal(keys[0, :, 6:], k_a[0]) and torch.equal(keys[1, :, 6:], k_b[0])
    assert torch.equal(values[0, :, 6:], v_a[0]) and torch.equal(values[1, :, 6:], v_b[0])
    empty = cache.fork(cache.add_sequence())          # an empty sequence forks into an empty one
    assert cache.seq_len(empty) == 0 and cache.blocks_of(empty) == []


def test_fork_of_a_pool_too_small_raises_and_changes_nothing():
    cache = make_cache(num_blocks=3)
    a = cache.add_sequence()
    cache.append(a, *tokens(5))                       # 2 of 3 blocks
    with pytest.raises(CacheFullError, match=r"fork: sequence 0 holds 2 blocks, only 1 of 3 are free"):
        cache.fork(a)
    assert cache.sequence_ids == [a] and cache.num_free_blocks == 1


def test_truncate_frees_the_blocks_past_the_length_and_appends_after_it():
    cache = make_cache(num_blocks=4)
    seq = cache.add_sequence()
    k, v = tokens(10)                                 # 3 blocks
    cache.append(seq, k, v)
    cache.truncate(seq, 5)                            # keeps 2 blocks
    assert cache.seq_len(seq) == 5 and len(cache.blocks_of(seq)) == 2 and cache.num_free_blocks == 2
    k2, v2 = tokens(4)
    cache.append(seq, k2, v2)                         # overwrites slot 5 onwards
    keys, values = cache.gather([seq])
    assert torch.equal(keys[0], torch.cat([k[0, :, :5], k2[0]], dim=1))
    assert torch.equal(values[0], torch.cat([v[0, :, :5], v2[0]], dim=1))
    cache.truncate(seq, 0)
    assert cache.seq_len(seq) == 0 and cache.num_free_blocks == 4
    with pytest.raises(ValueError, match=r"truncate: expected a length in \[0, 0\] \(sequence 0's tokens\), got 1"):
        cache.truncate(seq, 1)


def test_errors():
    cache = make_cache(max_seqs=1)
    seq = cache.add_sequence()
    with pytest.raises(CacheFullError, match="max_seqs=1"):
        cache.add_sequence()
    with pytest.raises(ValueError, match=r"unknown sequence id 7; live ids are \[0\]"):
        cache.append(7, *tokens(1))
    with pytest.raises(ValueError, match=r"shape \[B, Hkv, T, D\]=\[1, 2, 'T', 8\], got \[1, 3, 2, 8\]"):
        cache.append(seq, torch.randn(1, 3, 2, D), torch.randn(1, 3, 2, D))
    with pytest.raises(ValueError, match=r"got \[1, 2, 2, 4\]"):
        cache.append(seq, torch.randn(1, HKV, 2, 4), torch.randn(1, HKV, 2, 4))
    with pytest.raises(ValueError, match=r"dtype torch.float32 \(the pool's\), got torch.float16"):
        cache.append(seq, *(t.half() for t in tokens(2)))
    with pytest.raises(ValueError, match=r"one length T, got 2 and 3"):
        cache.append(seq, tokens(2)[0], tokens(3)[1])
    with pytest.raises(ValueError, match=r"distinct sequence ids"):
        cache.seq_lens([seq, seq])
    cache.free_sequence(seq)
    with pytest.raises(ValueError, match="unknown sequence id 0"):
        cache.free_sequence(seq)
    with pytest.raises(ValueError, match="block_size a positive int"):
        PagedKVCache(4, 0, HKV, D)
