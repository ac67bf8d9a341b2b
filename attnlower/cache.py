"""A paged KV cache in plain PyTorch, in the layout `attnlower::paged_attention` reads.

K and V live in two pools `[num_blocks, Hkv, block_size, D]`. A sequence owns a list of blocks
(taken from a free list as it grows, so its blocks need not be contiguous or ordered); token `t`
of a sequence is stored at slot `t % block_size` of its block number `t // block_size`.
`block_table(ids)` and `seq_lens(ids)` describe a batch of sequences for the op;
`gather(ids)` rebuilds dense K/V for eager attention.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def gather_blocks(pool: Tensor, block_table: Tensor) -> Tensor:
    """Dense `[B, Hkv, max_blocks * block_size, D]` view-order copy of each sequence's blocks.

    The compile-friendly gather: inside a `torch.compile`d model, `gather_blocks(pool, table)`
    followed by any attention spelling (masked with `length_mask`) is recognized by attnlower and
    replaced by `paged_attention` on the pool itself, so the gather never runs. Positions past a
    sequence's length hold whatever its blocks hold (padding table entries read block 0): mask
    them with `length_mask(seq_lens, ...)`.
    """
    gathered = pool[block_table.long()]              # [B, max_blocks, Hkv, block_size, D]
    b, nblk, heads, bsz, dim = gathered.shape
    return gathered.permute(0, 2, 1, 3, 4).reshape(b, heads, nblk * bsz, dim)


def length_mask(seq_lens: Tensor, length: int) -> Tensor:
    """Bool keep-mask `[B, 1, 1, length]`: key `t` of sequence `b` is visible iff `t < seq_lens[b]`."""
    positions = torch.arange(length, device=seq_lens.device)
    return positions[None, None, None, :] < seq_lens[:, None, None, None]


class CacheFullError(RuntimeError):
    """The pool has too few free blocks (or sequence slots) for the request."""


@dataclass
class _SequenceState:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


class PagedKVCache:
    """Block-paged K/V storage for many sequences of varying length.

    Args:
        num_blocks: blocks in each pool.
        block_size: tokens per block.
        num_kv_heads, head_dim: the K/V head layout (`Hkv`, `D`).
        dtype, device: of the pools.
        max_seqs: how many sequences may be live at once (None: unbounded).

    Attributes:
        k_pool, v_pool: `[num_blocks, num_kv_heads, block_size, head_dim]`, zero-initialised.
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 max_seqs: int | None = None):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PagedKVCache: expected {name} a positive int, got {value!r}")
        if max_seqs is not None and max_seqs <= 0:
            raise ValueError(f"PagedKVCache: expected max_seqs > 0 or None, got {max_seqs}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device, self.max_seqs = dtype, torch.device(device), max_seqs
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        # Zeros, not empty: slots never written stay finite, so a gather or a kernel that
        # reads a whole block never meets uninitialised NaN/inf.
        self.k_pool = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=self.device)
        # The pool's own device is the canonical one: "cuda" becomes "cuda:0" (the current device),
        # so tensors on cuda:0 compare equal to it (torch.device("cuda") != torch.device("cuda:0")).
        self.device = self.k_pool.device
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._sequences: dict[int, _SequenceState] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ bookkeeping

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self._free_blocks)

    @property
    def sequence_ids(self) -> list[int]:
        """Ids of the live sequences, in creation order."""
        return list(self._sequences)

    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id (ids are never reused)."""
        if self.max_seqs is not None and len(self._sequences) >= self.max_seqs:
            raise CacheFullError(f"PagedKVCache: all max_seqs={self.max_seqs} sequence slots are in "
                                 f"use; free_sequence() a finished one or raise max_seqs")
        seq_id = self._next_id
        self._next_id += 1
        self._sequences[seq_id] = _SequenceState()
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        """Drop a sequence and return its blocks to the free list."""
        state = self._state(seq_id)
        self._free_blocks.extend(state.blocks)
        del self._sequences[seq_id]

    def fork(self, seq_id: int) -> int:
        """Start a sequence holding a copy of `seq_id`'s tokens (its own blocks: the two then grow apart, as
        beams do); returns the new id. CacheFullError, with nothing changed, when the pool lacks the blocks."""
        source = self._state(seq_id)
        if len(source.blocks) > len(self._free_blocks):
            raise CacheFullError(f"PagedKVCache.fork: sequence {seq_id} holds {len(source.blocks)} blocks, only "
                                 f"{len(self._free_blocks)} of {self.num_blocks} are free; free_sequence() finished "
                                 f"sequences or build a larger cache")
        new_id = self.add_sequence()
        state = self._sequences[new_id]
        state.blocks = [self._free_blocks.popleft() for _ in source.blocks]
        state.length = source.length
        if state.blocks:
            src = torch.tensor(source.blocks, dtype=torch.int64, device=self.device)
            dst = torch.tensor(state.blocks, dtype=torch.int64, device=self.device)
            self.k_pool[dst] = self.k_pool[src]
            self.v_pool[dst] = self.v_pool[src]
        return new_id

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep the first `length` tokens of a sequence (0 <= length <= its length); the blocks past them go back
        to the free list."""
        state = self._state(seq_id)
        if not isinstance(length, int) or not 0 <= length <= state.length:
            raise ValueError(f"PagedKVCache.truncate: expected a length in [0, {state.length}] (sequence {seq_id}'s "
                             f"tokens), got {length!r}")
        keep = -(-length // self.block_size)
        self._free_blocks.extend(state.blocks[keep:])
        del state.blocks[keep:]
        state.length = length

    def seq_len(self, seq_id: int) -> int:
        """Tokens stored for one sequence."""
        return self._state(seq_id).length

    def blocks_of(self, seq_id: int) -> list[int]:
        """The block ids a sequence owns, in token order."""
        return list(self._state(seq_id).blocks)

    def _state(self, seq_id: int) -> _SequenceState:
        state = self._sequences.get(seq_id)
        if state is None:
            raise ValueError(f"PagedKVCache: unknown sequence id {seq_id!r}; live ids are "
                             f"{self.sequence_ids} (add_sequence() creates one)")
        return state

    def _ids(self, seq_ids: int | Sequence[int]) -> list[int]:
        ids = [seq_ids] if isinstance(seq_ids, int) else [int(i) for i in seq_ids]
        for seq_id in ids:
            self._state(seq_id)
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedKVCache: expected distinct sequence ids in one batch, got {ids}")
        return ids

    # ------------------------------------------------------------------ writing

    def _check_new(self, name: str, t: Tensor, batch: int) -> None:
        expected = [batch, self.num_kv_heads, "T", self.head_dim]
        if t.dim() != 4 or t.shape[0] != batch or t.shape[1] != self.num_kv_heads \
                or t.shape[3] != self.head_dim:
            raise ValueError(f"PagedKVCache.append: expected {name} of shape [B, Hkv, T, D]="
                             f"{expected}, got {list(t.shape)}; a [B, T, Hkv, D] tensor needs "
                             f".transpose(1, 2)")
        if t.dtype != self.dtype:
            raise ValueError(f"PagedKVCache.append: expected {name} of dtype {self.dtype} (the "
                             f"pool's), got {t.dtype}; pass {name}.to({self.dtype})")
        if t.device != self.device:
            raise ValueError(f"PagedKVCache.append: expected {name} on {self.device} (the pool's), "
                             f"got {t.device}")

    def append(self, seq_ids: int | Sequence[int], k_new: Tensor, v_new: Tensor) -> None:
        """Append `T` tokens to each sequence of a batch.

        Args:
            seq_ids: one id, or B distinct ids.
            k_new, v_new: `[B, Hkv, T, D]` in the pool's dtype and device (any strides).
        Blocks are allocated as needed; if the pool cannot hold the whole batch, nothing is
        written and CacheFullError is raised.
        """
        ids = self._ids(seq_ids)
        batch = len(ids)
        self._check_new("k_new", k_new, batch)
        self._check_new("v_new", v_new, batch)
        if k_new.shape[2] != v_new.shape[2]:
            raise ValueError(f"PagedKVCache.append: expected k_new and v_new with one length T, "
                             f"got {k_new.shape[2]} and {v_new.shape[2]}")
        new_tokens = k_new.shape[2]
        if new_tokens == 0:
            return
        states = [self._sequences[i] for i in ids]
        extra_blocks = [-(-(s.length + new_tokens) // self.block_size) - len(s.blocks) for s in states]
        if sum(extra_blocks) > len(self._free_blocks):
            raise CacheFullError(f"PagedKVCache.append: need {sum(extra_blocks)} more blocks of "
                                 f"{self.block_size} tokens, only {len(self._free_blocks)} of "
                                 f"{self.num_blocks} are free; free_sequence() finished sequences or "
                                 f"build a larger cache")
        block_ids, slots = [], []
        for state, extra in zip(states, extra_blocks):
            state.blocks.extend(self._free_blocks.popleft() for _ in range(extra))
            positions = range(state.length, state.length + new_tokens)
            block_ids.extend(state.blocks[t // self.block_size] for t in positions)
            slots.extend(t % self.block_size for t in positions)
            state.length += new_tokens
        block_index = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        slot_index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        # pool[block, :, slot] is [Hkv, D]; the new tokens, flattened over (b, t), are [B*T, Hkv, D].
        flat_k = k_new.transpose(1, 2).reshape(batch * new_tokens, self.num_kv_heads, self.head_dim)
        flat_v = v_new.transpose(1, 2).reshape(batch * new_tokens, self.num_kv_heads, self.head_dim)
        self.k_pool[block_index, :, slot_index] = flat_k
        self.v_pool[block_index, :, slot_index] = flat_v

    # ------------------------------------------------------------------ reading

    def seq_lens(self, seq_ids: int | Sequence[int]) -> Tensor:
        """int32 `[B]`: the stored length of each sequence."""
        ids = self._ids(seq_ids)
        return torch.tensor([self._sequences[i].length for i in ids], dtype=torch.int32,
                            device=self.device)

    def block_table(self, seq_ids: int | Sequence[int], max_blocks: int | None = None) -> Tensor:
        """int32 `[B, max_blocks]`: each sequence's blocks in token order, padded with 0.

        `max_blocks` defaults to the most blocks any of these sequences owns (at least 1); pass
        a fixed width to keep shapes static across decode steps.
        """
        ids = self._ids(seq_ids)
        tables = [self._sequences[i].blocks for i in ids]
        width = max([len(t) for t in tables] + [1])
        if max_blocks is not None:
            if max_blocks < width:
                raise ValueError(f"PagedKVCache.block_table: expected max_blocks >= {width} (the "
                                 f"longest of these sequences), got {max_blocks}")
            width = max_blocks
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(ids), width)

    def gather(self, seq_ids: int | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Dense `(K, V)`, each `[B, Hkv, L, D]` with L the longest of these sequences.

        Positions at or past a sequence's own length are zero (finite, so masked eager attention
        never meets NaN); mask them out (e.g. by `seq_lens`) before use.
        """
        ids = self._ids(seq_ids)
        lens = [self._sequences[i].length for i in ids]
        longest = max(lens + [0])
        keys = torch.zeros((len(ids), self.num_kv_heads, longest, self.head_dim), dtype=self.dtype,
                           device=self.device)
        values = torch.zeros_like(keys)
        for row, (seq_id, length) in enumerate(zip(ids, lens)):
            blocks = torch.tensor(self._sequences[seq_id].blocks, dtype=torch.int64,
                                  device=self.device)
            if length == 0:
                continue
            for pool, dense in ((self.k_pool, keys), (self.v_pool, values)):
                # [n, Hkv, block_size, D] -> [Hkv, n * block_size, D], cut to the length.
                seq = pool[blocks].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)
                dense[row, :, :length] = seq[:, :length]
        return keys, values
