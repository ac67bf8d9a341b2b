"""Bad block tables and sequence lengths, found on the device and reported without a host sync.

The paged kernel (`kernels/paged_decode.py`) always clamps what it reads: a block id outside
`[0, num_blocks)` or a length outside `[0, max_blocks * block_size]` never makes it read outside
the pool or the table. With checks on (the default) it also records what it saw in a per-device
flag buffer, int32 [4]: (kinds seen as a bitmask, the smallest offending sequence, num_blocks,
capacity). Reading that buffer right away would synchronize the host with the GPU on every decode
step, so it is read lazily:

  - CUDA: after each launch the flags are copied asynchronously into pinned host memory; the next
    paged call (or `attnlower.check_errors()`) reads that host copy and raises. A captured CUDA
    graph holds no copy (it would slow every replay): the kernel still sets the flags, and
    `attnlower.check_errors()` (one sync) reads them where the serving loop can afford it.
  - CPU (Triton's interpreter): read right after the launch, so the call itself raises.

`set_paged_checks(False)` (or `ATTNLOWER_PAGED_CHECKS=0`) skips the recording and the copy, for
serving loops that validate their tables themselves; the clamps stay. The reference
(`lowering/reference.py`) checks on the host and raises the same errors at once.
"""
from __future__ import annotations

import os

import torch

BAD_BLOCK_ID, LEN_TOO_LONG, LEN_NEGATIVE = 1, 2, 4
_NO_SEQUENCE = 2**31 - 1

_checks = os.environ.get("ATTNLOWER_PAGED_CHECKS", "1") not in ("0", "off", "false")


class PagedInputError(ValueError):
    """A block table or seq_lens that does not fit the cache (raised lazily on CUDA, see module doc)."""


def set_paged_checks(enabled: bool) -> None:
    """Turn the paged kernel's bounds reports on (default) or off (the kernel still clamps)."""
    global _checks
    _checks = bool(enabled)


def paged_checks_enabled() -> bool:
    return _checks


def paged_input_message(kinds: int, seq: int, num_blocks: int, capacity: int, *, lazily: bool) -> str:
    """The error for flags `kinds` seen for sequence `seq`: expected / got / what to do."""
    got = []
    if kinds & BAD_BLOCK_ID:
        got.append(f"a block id outside [0, num_blocks={num_blocks}) among its first "
                   f"ceil(seq_len / block_size) block_table entries")
    if kinds & LEN_TOO_LONG:
        got.append(f"a seq_len beyond the table's capacity max_blocks * block_size = {capacity}")
    if kinds & LEN_NEGATIVE:
        got.append("a negative seq_len")
    when = ("an earlier call on this device (reported lazily: the check reads no GPU value on the hot path; "
            "its output was computed from clamped reads and is not meaningful)" if lazily else "this call")
    return (f"attnlower::paged_attention: {when} got, for sequence {seq}, {' and '.join(got)}; expected "
            f"0 <= seq_len <= {capacity} and every block id a sequence uses in [0, {num_blocks}). Build the "
            f"table and lengths with PagedKVCache.block_table(...) / .seq_lens(...), or widen the table")


class _DeviceFlags:
    """The flag buffer of one device and, on CUDA, its pinned host copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flags = torch.tensor([0, _NO_SEQUENCE, 0, 0], dtype=torch.int32, device=device)
        self.host = None
        if device.type == "cuda":
            # device="cpu" explicitly: under torch.set_default_device("cuda") a bare zeros() is a CUDA tensor,
            # which cannot be pinned (seen on an H200 with ATTNLOWER_TEST_DEVICE=cuda)
            self.host = torch.zeros(4, dtype=torch.int32, device="cpu").pin_memory()
            self.host_view = self.host.numpy()  # reads without dispatching a torch op

    def after_launch(self) -> None:
        if self.host is None:
            self.raise_if_set(self.flags.tolist(), lazily=False)
        elif not torch.cuda.is_current_stream_capturing():
            # Not inside a captured graph: a copy node there costs each replay ~15 us (H200,
            # paged decode B=1 L=4096: 0.030 ms replayed with it, 2026-12-01); graphs rely on
            # check_errors(), which reads the device flags themselves.
            self.host.copy_(self.flags, non_blocking=True)

    def before_launch(self) -> None:
        if self.host is not None and self.host_view[0] != 0:
            self.raise_if_set(self.host_view.tolist(), lazily=True)

    def raise_if_set(self, values, *, lazily: bool) -> None:
        kinds, seq, num_blocks, capacity = (int(x) for x in values)
        if kinds == 0:
            return
        self.reset()
        raise PagedInputError(paged_input_message(kinds, seq, num_blocks, capacity, lazily=lazily))

    def reset(self) -> None:
        self.flags.copy_(torch.tensor([0, _NO_SEQUENCE, 0, 0], dtype=torch.int32, device=self.device))
        if self.host is not None:
            self.host.zero_()


_FLAGS: dict[torch.device, _DeviceFlags] = {}  # one entry per device used: bounded by the device count


def device_flags(device: torch.device) -> _DeviceFlags:
    flags = _FLAGS.get(device)
    if flags is None:
        flags = _FLAGS[device] = _DeviceFlags(device)
    return flags


def check_errors() -> None:
    """Raise PagedInputError if a paged call on any device saw a bad block id or sequence length.

    Waits for the device (one sync per device used): call it where a sync is affordable, e.g. after
    a replayed CUDA graph, or every N decode steps of a serving loop.
    """
    for flags in list(_FLAGS.values()):
        flags.raise_if_set(flags.flags.tolist(), lazily=True)
