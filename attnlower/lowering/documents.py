"""Document mode (packed sequences, issue 21.3): ids from what models and collators hand over (the bounds the
kernels skip blocks by are launch.document_bounds, one kernel: kernels/documents.py). Every function here is a few device ops: no `.item()`, no `nonzero`, no
data-dependent shape, so it traces (FakeTensorMode, torch.compile(fullgraph=True)) and a CUDA graph captures it
(a new packing copied into the captured ids replays correctly).

Semantics (docs/INTERFACES.md section 1): `doc_ids [B|1, Tk]` int32 / int64; query i sits at key position
i + off (off = Tk - Tq with bottom_right, else 0) and sees key j only when doc_ids[b, i + off] == doc_ids[b, j].
Any ids are exact; the kernels skip key blocks of other documents only for rows whose ids are non-decreasing
(documents are runs), which every packing source produces.
"""
from __future__ import annotations

import torch
from torch import Tensor


def doc_ids_from_position_ids(position_ids: Tensor) -> Tensor:
    """int32 [B, T] document ids from position ids [B, T] that restart at each document (HF's
    DataCollatorWithFlattening): a document starts wherever position_ids[t] != position_ids[t - 1] + 1, as HF's
    `masking_utils.find_packed_sequence_indices` places the boundaries. On the device, no host sync."""
    if position_ids.dim() != 2 or position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids_from_position_ids: expected integer position_ids of shape [B, T], got "
                         f"{position_ids.dtype} {list(position_ids.shape)}")
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    return (step != 1).cumsum(-1, dtype=torch.int32)


def doc_ids_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """int32 [1, total] document ids of one packed row from flash-attn varlen offsets cu_seqlens [n + 1]
    (0, len0, len0 + len1, ...): token t belongs to document i when cu_seqlens[i] <= t < cu_seqlens[i + 1]. `total`
    is the packed length (a Python int: the shape must not depend on the offsets' values)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"doc_ids_from_cu_seqlens: expected integer cu_seqlens of shape [n + 1], got "
                         f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}")
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.bucketize(positions, cu_seqlens[1:], right=True).to(torch.int32).unsqueeze(0)
