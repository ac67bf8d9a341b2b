"""Launcher of the paged-attention Triton kernels (`attnlower::paged_attention` on CUDA, and on
CPU under `TRITON_INTERPRET=1`).

Chooses tiles through `lowering/configs.py`, decides whether to split the key range
(flash-decoding) from the SM count, the grid size and the longest possible sequence, and
launches `_paged_attn_kernel` (plus `_paged_reduce_kernel` when split). Inputs arrive validated
by `lowering/ops.py` (docs/INTERFACES.md section 1); tensors may have any strides.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
from torch import Tensor

from attnlower.lowering.configs import KernelConfig, paged_config, paged_num_splits
from attnlower.lowering.kernels.paged_decode import _paged_attn_kernel, _paged_reduce_kernel

# Off-GPU (Triton interpreter) there are no SMs; a small count keeps the split decision
# meaningful in tests without launching many interpreted programs.
_CPU_SM_COUNT = 4


# Cached per device: decode launches are host-bound at small batch, every microsecond counts.
@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_SM_COUNT


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 0


def _dot_mode(q: Tensor) -> tuple[str, bool]:
    """(DOT_PRECISION, DOT_FP32_INPUTS) of the kernel's tl.dot calls for q's device and dtype."""
    # Off-GPU the kernel runs in Triton's interpreter, whose bf16 tl.dot is wrong: dot in fp32
    # from the same rounded values instead (see the kernel header).
    fp32_inputs = q.device.type != "cuda" and q.dtype != torch.float32
    # fp32 inputs get IEEE fp32 dots: TF32 would miss the fp32 accuracy users of fp32 expect
    return ("ieee" if q.dtype == torch.float32 or fp32_inputs else "tf32"), fp32_inputs


def paged_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                  alibi_slopes: Tensor | None, scale: float, causal: bool, window: int, softcap: float,
                  *, num_splits: int | None = None, config: KernelConfig | None = None) -> Tensor:
    """Paged attention (docs/INTERFACES.md, "Semantics (paged)") -> out [B, Hq, Tq, D], contiguous.

    q [B, Hq, Tq, D]; k_cache / v_cache [num_blocks, Hkv, block_size, D]; block_table
    [B, max_blocks] int32; seq_lens [B] int32; alibi_slopes None, fp32 [Hq] or [B, Hq].
    `num_splits` and `config` override the heuristics (tests and benchmarks); None = choose.
    """
    batch, q_heads, tq, head_dim = q.shape
    num_blocks, kv_heads, block_size, _ = k_cache.shape
    group = q_heads // kv_heads
    rows_m = group * tq
    out = torch.empty((batch, q_heads, tq, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if config is None:
        config = paged_config(_arch(q.device), head_dim, q.dtype, block_size, group, tq)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    m_tiles = triton.cdiv(rows_m, config.block_m)
    programs = batch * kv_heads * m_tiles
    if num_splits is None:
        # The longest sequence is bounded by the table's width: reading seq_lens.max() would
        # synchronize the host with the GPU on every decode step (and break CUDA graphs).
        num_splits = paged_num_splits(_sm_count(q.device), programs, block_table.shape[1] * block_size)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split = num_splits > 1

    if alibi_slopes is not None:
        # [Hq] broadcasts over the batch through a zero batch stride
        stride_ab = alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0
        stride_ah = alibi_slopes.stride(-1)
    else:
        stride_ab = stride_ah = 0

    rows_total = batch * q_heads * tq
    if split:
        m_ws = torch.empty((num_splits, rows_total), dtype=torch.float32, device=q.device)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty((num_splits, rows_total, head_dim), dtype=torch.float32, device=q.device)
    else:
        m_ws = l_ws = acc_ws = None

    dot_precision, dot_fp32_inputs = _dot_mode(q)
    guard = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _paged_attn_kernel[(batch * kv_heads, m_tiles, num_splits)](
            q, k_cache, v_cache, block_table, seq_lens, alibi_slopes,
            out, m_ws, l_ws, acc_ws,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            *block_table.stride(), seq_lens.stride(0),
            stride_ab, stride_ah,
            q_heads, kv_heads, tq, rows_total,
            float(scale), float(softcap), int(window), num_splits,
            GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            IS_CAUSAL=bool(causal), HAS_WINDOW=window > 0,
            HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
            SPLIT=split, DOT_PRECISION=dot_precision, DOT_FP32_INPUTS=dot_fp32_inputs,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if split:
            _paged_reduce_kernel[(rows_total,)](
                out, m_ws, l_ws, acc_ws, rows_total, num_splits,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
                SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
                num_warps=4 if head_dim_pad <= 128 else 8,
            )
    return out
