"""Bad block tables and sequence lengths, found on the device and reported without a host sync.

The paged kernel (`kernels/paged_decode.py`) always clamps what it reads: a block id outside
`[0, num_blocks)` or a length outside `[0, max_blocks * block_size]` never makes it read outside
the pool or the table. With checks on (the default) it also records what it saw in a per-device
flag buffer, int32 [4]: (kinds seen as a bitmask, the smallest offending sequence, num_blocks,
capacity). Reading that buffer right away would synchronize the host with the GPU on every decode
step, so it is read lazily:

  - CUDA: after each launch the flags are copied asynchronously into a ring of pinned host slots, one
    per call; a later paged call (or `attnlower.check_errors()`) sees a set flag there and raises,
    naming the first call whose copy shows it (its number on this device and its shapes). Within
    `batched_reports()` the calls copy nothing and the flags are copied once when it ends, into one
    slot naming the batch's calls: `compiler/backend.py` runs each call of a compiled CUDA graph that
    holds more than one paged op so (after its first call), one copy per decode step instead of one
    per layer; the calls of that batch are reported from its end on. A captured
    CUDA graph holds no copy (it would slow every replay): the kernel still sets the flags, and
    `attnlower.check_errors()` (one sync) reads them where the serving loop can afford it.
  - CUDA with `ATTNLOWER_PAGED_CHECKS=sync` (or `set_paged_checks(True, sync=True)`): a debug switch
    that reads the flags right after each launch (one host sync per call), so the bad call itself raises.
  - CPU (Triton's interpreter): read right after the launch, so the call itself raises.

`set_paged_checks(False)` (or `ATTNLOWER_PAGED_CHECKS=0`) skips the recording and the copy, for
serving loops that validate their tables themselves; the clamps stay. The reference
(`lowering/reference.py`) checks on the host and raises the same errors at once.

What is an error (docs/INTERFACES.md, "Semantics (paged)"): a block id outside the pool among the
blocks a sequence uses, a negative length, a length beyond the table (max_blocks * block_size), and a
sequence shorter than its Tq queries (0 < seq_len < Tq: the queries are the last Tq tokens of the
sequence, so some would sit before its first token) unless the call opts in with `empty_rows_nan=False / True`
(those queries see no key: 0 / NaN). An empty sequence (seq_len = 0, a padding slot of a fixed-size batch) is not
an error: its rows are 0 (NaN with `empty_rows_nan=True`).
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BAD_BLOCK_ID, LEN_TOO_LONG, LEN_NEGATIVE, SHORTER_THAN_TQ = 1, 2, 4, 8
_NO_SEQUENCE = 2**31 - 1
_RING = 64  # pinned host slots per device: a bad call is named if it is seen within 64 copies
_batch = threading.local()   # .pending: {device flags: [(call number, q shape), ...]} within batched_reports()

_MODES = {"1": "lazy", "on": "lazy", "true": "lazy", "lazy": "lazy", "0": "off", "off": "off", "false": "off",
          "sync": "sync"}


def _mode_from_env() -> str:
    value = os.environ.get("ATTNLOWER_PAGED_CHECKS", "1").lower()
    if value not in _MODES:
        raise ValueError(f"ATTNLOWER_PAGED_CHECKS: expected 1 (checks on, reported lazily), 0 (off) or sync "
                         f"(raise at the bad call itself, one host sync per call), got {value!r}")
    return _MODES[value]


_mode = _mode_from_env()


class PagedInputError(ValueError):
    """A block table or seq_lens that does not fit the cache (raised lazily on CUDA, see module doc)."""


def set_paged_checks(enabled: bool, *, sync: bool = False) -> None:
    """Turn the paged kernel's bounds reports on (default) or off (the kernel still clamps).

    sync=True (debug): on CUDA, read the report right after each launch so the bad call itself raises
    (one host sync per call)."""
    global _mode
    _mode = ("sync" if sync else "lazy") if enabled else "off"


def paged_checks_enabled() -> bool:
    return _mode != "off"


def paged_checks_sync() -> bool:
    return _mode == "sync"


def paged_checks_mode() -> str:
    """"lazy", "sync" or "off" (part of a cached launch's key: it changes the kernel and the host side)."""
    return _mode


def paged_input_message(kinds: int, seq: int, num_blocks: int, capacity: int, *, lazily: bool,
                        call: str = "", tq: int | None = None) -> str:
    """The error for flags `kinds` seen for sequence `seq`: expected / got / what to do."""
    got = []
    if kinds & BAD_BLOCK_ID:
        got.append(f"a block id outside [0, num_blocks={num_blocks}) among its first "
                   f"ceil(seq_len / block_size) block_table entries")
    if kinds & LEN_TOO_LONG:
        got.append(f"a seq_len beyond the table's capacity max_blocks * block_size = {capacity}")
    if kinds & LEN_NEGATIVE:
        got.append("a negative seq_len")
    if kinds & SHORTER_THAN_TQ:
        got.append(f"a seq_len shorter than its {'Tq' if tq is None else f'Tq={tq}'} queries (the queries are "
                   f"the last Tq tokens of the sequence: append them to the cache before attending, or pass "
                   f"empty_rows_nan=False / True to compute a chunk longer than the sequence, its queries before "
                   f"the first token giving 0 / NaN)")
    if lazily:
        which = call or "an earlier call on this device"
        when = (f"{which} (reported lazily: the check reads no GPU value on the hot path; its output was "
                f"computed from clamped reads and is not meaningful; ATTNLOWER_PAGED_CHECKS=sync raises at the "
                f"bad call itself)")
    else:
        when = "this call"
    return (f"attnlower::paged_attention: {when} got, for sequence {seq}, {' and '.join(got)}; expected "
            f"0 <= seq_len <= {capacity} (and seq_len >= Tq unless 0 or empty_rows_nan is set) and every block "
            f"id a sequence uses in [0, {num_blocks}). Build the table and lengths with "
            f"PagedKVCache.block_table(...) / .seq_lens(...), or widen the table")


class _DeviceFlags:
    """The flag buffer of one device and, on CUDA, a ring of pinned host copies (one slot per call)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flags = torch.tensor([0, _NO_SEQUENCE, 0, 0], dtype=torch.int32, device=device)
        self.host = None
        self.calls = 0                       # paged calls launched on this device (with checks on)
        self.slot_calls = [None] * _RING     # (first call, last call, their q shapes) each host slot's copy names
        self.copies = 0                      # copies into the ring so far: the next one's slot
        if device.type == "cuda":
            # device="cpu" explicitly: under torch.set_default_device("cuda") a bare zeros() is a CUDA tensor,
            # which cannot be pinned (seen on an H200 with ATTNLOWER_TEST_DEVICE=cuda)
            self.attach_ring(torch.zeros((_RING, 4), dtype=torch.int32, device="cpu").pin_memory())

    def attach_ring(self, host: torch.Tensor) -> None:
        """Keep the per-call copies of the flags in `host` (int32 [_RING, 4], pinned on CUDA)."""
        self.host = host
        self.host_view = host.numpy()      # reads without dispatching a torch op
        self.host_slots = host.unbind(0)   # one view per slot, made once: indexing per call is a torch op
        self.last_slot = 0

    def after_launch(self, q_shape=None) -> None:
        self.calls += 1
        if self.host is None or _mode == "sync":
            self.raise_if_set(self.flags.tolist(), lazily=False, tq=None if q_shape is None else q_shape[2])
        elif not torch.cuda.is_current_stream_capturing():
            # Not inside a captured graph: a copy node there costs each replay ~15 us (H200,
            # paged decode B=1 L=4096: 0.030 ms replayed with it, 2026-12-01); graphs rely on
            # check_errors(), which reads the device flags themselves.
            pending = getattr(_batch, "pending", None)
            if pending is not None:   # within batched_reports() on this thread: copied at its end
                pending.setdefault(self, []).append((self.calls, q_shape))
            else:
                self._copy((self.calls, self.calls, (q_shape,)))

    def flush(self, calls: list) -> None:
        """Copy the flags once for a batch's calls [(call number, q shape), ...], into one slot naming them."""
        self._copy((calls[0][0], calls[-1][0], tuple(shape for _, shape in calls)))

    def _copy(self, entry) -> None:
        """Copy the flags (asynchronously) into the next host slot; `entry` = (first call, last call, q shapes)."""
        self.copies += 1
        slot = self.copies % _RING
        self.slot_calls[slot] = entry
        self.host_slots[slot].copy_(self.flags, non_blocking=True)
        self.last_slot = slot

    def before_launch(self) -> None:
        if self.host is not None and self.host_view[self.last_slot, 0] != 0:
            self._raise_from_ring()

    def _raise_from_ring(self) -> None:
        """The flags are sticky: the first call (oldest in the ring) whose copy shows them is the bad one."""
        order = sorted((entry[0], slot) for slot, entry in enumerate(self.slot_calls) if entry is not None)
        for number, slot in order:
            if self.host_view[slot, 0] != 0:
                values = [int(x) for x in self.host_view[slot]]
                first, last, q_shapes = self.slot_calls[slot]
                q_shapes = list(dict.fromkeys(tuple(shape) for shape in q_shapes if shape is not None))
                shapes = f" (q {', '.join(str(list(shape)) for shape in q_shapes)})" if q_shapes else ""
                call = (f"paged call #{first} on {self.device}{shapes}" if first == last else
                        f"one of paged calls #{first}-#{last} on {self.device}, one compiled graph's call{shapes}")
                if order and order[0][1] == slot and self.copies > _RING:
                    call += " or a call before it"  # older copies were overwritten
                tq = q_shapes[0][2] if len(q_shapes) == 1 else None
                self.raise_if_set(values, lazily=True, call=call, tq=tq)

    def raise_if_set(self, values, *, lazily: bool, call: str = "", tq: int | None = None) -> None:
        kinds, seq, num_blocks, capacity = (int(x) for x in values)
        if kinds == 0:
            return
        self.reset()
        raise PagedInputError(paged_input_message(kinds, seq, num_blocks, capacity, lazily=lazily, call=call,
                                                  tq=tq))

    def reset(self) -> None:
        self.flags.copy_(torch.tensor([0, _NO_SEQUENCE, 0, 0], dtype=torch.int32, device="cpu"),
                         non_blocking=False)
        if self.host is not None:
            self.host.zero_()
            self.slot_calls = [None] * _RING
            self.copies = 0


@contextlib.contextmanager
def batched_reports():
    """Within (on this thread; nested: the outermost counts): the paged calls on CUDA record themselves but leave
    their flags on the device; at the end each device that had calls copies its flags once, into one host slot that
    names those calls. A compiled graph holds one paged call per layer: its call (compiler/backend.py) then costs one
    copy, not one per layer. A bad call of the batch is reported by the first paged call (or check_errors()) after
    the batch's end, named as one of the batch's calls."""
    if getattr(_batch, "pending", None) is not None:
        yield
        return
    _batch.pending = {}
    raised = True
    try:
        yield
        raised = False
    finally:
        pending, _batch.pending = _batch.pending, None
        for flags, calls in pending.items():
            try:
                flags.flush(calls)
            except Exception:  # noqa: BLE001 - a CUDA fault fails this copy too: the error to see is the batch's
                if not raised:
                    raise


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
        values = flags.flags.tolist()
        if values[0] != 0 and flags.host is not None:
            flags._raise_from_ring()   # name the call when its copy says which
        flags.raise_if_set(values, lazily=True)


def clear_errors() -> None:
    """Forget every recorded report without raising (tests; a serving loop that handled the error)."""
    for flags in list(_FLAGS.values()):
        flags.reset()
