"""Launchers of the dense attention kernels (`attnlower::flash_attention`,
`attnlower::sliding_window_attention` and their backward) on CUDA, and on CPU under `TRITON_INTERPRET=1`.

They turn tensors into strides, a grid and constexpr specializations, take tiles from
`lowering/configs.py`, and launch `kernels/flash_fwd.py` / `kernels/flash_bwd.py`. Inputs arrive
validated by `lowering/ops.py` (docs/INTERFACES.md section 1). q, k, v, bias and grad_out may have any
strides (BSHD views included): nothing here copies them.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from attnlower.lowering.configs import KernelConfig, flash_config
from attnlower.lowering.kernels.flash_bwd import (
    _flash_bwd_dkdv_kernel,
    _flash_bwd_dq_kernel,
    _flash_bwd_preprocess_kernel,
)
from attnlower.lowering.kernels.flash_fwd import _flash_fwd_kernel

_MAX_HEAD_DIM = 256
_BIAS_NONE, _BIAS_BOOL, _BIAS_FLOAT = 0, 1, 2


def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 0


def _head_dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(q: Tensor) -> str:
    """fp32 dots: exact ("ieee") unless the user allowed TF32 for CUDA matmuls. 16-bit inputs ignore it,
    except bf16 under Triton's interpreter, whose tl.dot multiplies bf16 as raw integers: upcast there."""
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return "upcast_ieee"
    if q.dtype != torch.float32:
        return "tf32"  # Triton's default input_precision; tensor cores multiply fp16/bf16 exactly
    if q.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check_supported(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> None:
    """Limits of the kernels themselves (ops.py validates everything a user can get wrong in general)."""
    head_dim = q.shape[-1]
    if v.shape[-1] != head_dim:
        raise NotImplementedError(f"flash kernels: expected v's head dim equal to q's ({head_dim}), got "
                                  f"{v.shape[-1]}; the reference implementation handles Dv != D")
    if head_dim > _MAX_HEAD_DIM:
        raise NotImplementedError(f"flash kernels: expected head_dim <= {_MAX_HEAD_DIM}, got {head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash kernels: expected fp16/bf16/fp32, got {q.dtype}; compute in fp32 or run on CPU")
    if dropout_p > 0 and q.shape[2] * k.shape[2] >= 2**32:
        # the Philox counter of a (b, h) holds i * Tk + j in 32 bits (kernels/flash_fwd.py, _dropout_keep)
        raise NotImplementedError(f"flash kernels: dropout needs Tq * Tk < 2**32, got Tq={q.shape[2]}, "
                                  f"Tk={k.shape[2]}")


def _bias_args(bias: Tensor | None, q: Tensor, k: Tensor) -> tuple[Tensor, int, tuple[int, int, int, int]]:
    """(pointer tensor, BIAS_KIND, strides of the bias seen as [B, Hq, Tq, Tk]; 0 on broadcast dims)."""
    if bias is None:
        return q, _BIAS_NONE, (0, 0, 0, 0)
    full = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # a view: broadcast dims get stride 0
    kind = _BIAS_BOOL if bias.dtype == torch.bool else _BIAS_FLOAT
    return full, kind, tuple(full.stride())


def _slope_args(alibi_slopes: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(fp32 slopes, (stride over batch, stride over head)); [Hq] slopes get batch stride 0."""
    if alibi_slopes is None:
        return q, (0, 0)
    slopes = alibi_slopes.to(torch.float32)
    if slopes.dim() == 1:
        return slopes, (0, slopes.stride(0))
    return slopes, (slopes.stride(0), slopes.stride(1))


def _rng_args(rng_state: Tensor, dropout_p: float) -> tuple[int, int, int]:
    """(seed, low, high 32 bits of the base counter) from rng_state [seed, offset] (on CPU: no sync)."""
    if dropout_p <= 0:
        return 0, 0, 0
    if rng_state.numel() != 2:
        raise ValueError(f"flash kernels: expected rng_state int64 [2] (seed, offset) with dropout_p > 0, "
                         f"got shape {tuple(rng_state.shape)}")
    seed, offset = (int(x) for x in rng_state.tolist())
    return seed, offset & 0xFFFFFFFF, (offset >> 32) & 0xFFFFFFFF


def _diag_offset(q: Tensor, k: Tensor, bottom_right: bool) -> int:
    return k.shape[2] - q.shape[2] if bottom_right else 0


def _specialization(q, bias_kind, causal, window, softcap, alibi_slopes, dropout_p, head_dim) -> dict:
    """The constexprs shared by every dense kernel."""
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_head_dim_pad(head_dim),
        IS_CAUSAL=bool(causal or window > 0), HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, BIAS_KIND=bias_kind, HAS_DROPOUT=dropout_p > 0,
        DOT_PRECISION=_dot_precision(q),
    )


def flash_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
                  scale: float, causal: bool, bottom_right: bool, softcap: float, dropout_p: float,
                  window: int, empty_rows_nan: bool, rng_state: Tensor,
                  *, config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Dense attention forward (docs/INTERFACES.md, "Semantics (dense ops)") -> (out, lse).

    q [B, Hq, Tq, D], k / v [B, Hkv, Tk, D], any strides. window > 0 is the sliding op (always
    causal). Returns out [B, Hq, Tq, D] contiguous in q's dtype and lse fp32 [B, Hq, Tq].
    `config` overrides the tiles from configs.flash_config (tests, benchmarks).
    """
    _check_supported(q, k, v, dropout_p)
    batch, q_heads, tq, head_dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    out = torch.empty((batch, q_heads, tq, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if tk == 0:  # every row is empty
        out.fill_(float("nan") if empty_rows_nan else 0.0)
        lse.fill_(float("-inf"))
        return out, lse
    if config is None:
        config = flash_config(_arch(q.device), head_dim, q.dtype, causal, window, "fwd")
    bias_t, bias_kind, stride_b = _bias_args(bias, q, k)
    slopes, stride_s = _slope_args(alibi_slopes, q)
    seed, rng_lo, rng_hi = _rng_args(rng_state, dropout_p)
    grid = (triton.cdiv(tq, config.block_m), batch * q_heads)
    _flash_fwd_kernel[grid](
        q, k, v, bias_t, slopes, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *stride_b, *stride_s, *out.stride(),
        q_heads, q_heads // kv_heads, tq, tk,
        float(scale), float(softcap), _diag_offset(q, k, bottom_right), int(window), float(dropout_p),
        seed, rng_lo, rng_hi,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        EMPTY_ROWS_NAN=bool(empty_rows_nan),
        **_specialization(q, bias_kind, causal, window, softcap, alibi_slopes, dropout_p, head_dim),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                   alibi_slopes: Tensor | None, out: Tensor, lse: Tensor, rng_state: Tensor, scale: float,
                   causal: bool, bottom_right: bool, softcap: float, dropout_p: float, window: int,
                   empty_rows_nan: bool, bias_requires_grad: bool,
                   *, config_kv: KernelConfig | None = None, config_q: KernelConfig | None = None,
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients (dq, dk, dv, dbias) of flash_forward, FlashAttention-2 style (kernels/flash_bwd.py).

    dq [B, Hq, Tq, D], dk / dv [B, Hkv, Tk, D] (reduced over the GQA group inside the kernel), all
    contiguous in their input's dtype. dbias (only when bias_requires_grad, float bias) has the bias's
    shape and dtype. Cost of dbias: the kernel writes dS once per (b, h, i, j); a bias of the full
    shape [B, Hq, Tq, Tk] receives it directly, a broadcast bias gets a full fp32 [B, Hq, Tq, Tk]
    buffer (4 bytes per score: B*Hq*Tq*Tk*4 bytes of memory and traffic) summed to its shape afterwards.
    `config_kv` / `config_q` override the tiles of the dK/dV and dQ kernels.
    """
    _check_supported(q, k, v, dropout_p)
    batch, q_heads, tq, head_dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    dq = torch.empty((batch, q_heads, tq, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, kv_heads, tk, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, kv_heads, tk, head_dim), dtype=v.dtype, device=v.device)

    dbias = None
    ds_full = None
    if bias_requires_grad:
        if bias is None or bias.dtype == torch.bool:
            raise ValueError("flash_backward: bias_requires_grad=True needs a float bias, got "
                             f"{None if bias is None else bias.dtype}")
        full_shape = (batch, q_heads, tq, tk)
        # zero-filled: pairs in skipped (causal / window) blocks are never written and have dS = 0
        if tuple(bias.shape) == full_shape:
            ds_full = torch.zeros(full_shape, dtype=bias.dtype, device=q.device)
        else:
            ds_full = torch.zeros(full_shape, dtype=torch.float32, device=q.device)

    if dq.numel() == 0 or tk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if ds_full is not None:
            dbias = ds_full.sum_to_size(bias.shape).to(bias.dtype)
        return dq, dk, dv, dbias

    arch = _arch(q.device)
    if config_kv is None:
        config_kv = flash_config(arch, head_dim, q.dtype, causal, window, "bwd_kv")
    if config_q is None:
        config_q = flash_config(arch, head_dim, q.dtype, causal, window, "bwd_q")
    bias_t, bias_kind, stride_b = _bias_args(bias, q, k)
    slopes, stride_s = _slope_args(alibi_slopes, q)
    seed, rng_lo, rng_hi = _rng_args(rng_state, dropout_p)
    lse = lse.contiguous()  # fp32 [B, Hq, Tq]: ours is already contiguous, this is a no-op then
    spec = _specialization(q, bias_kind, causal, window, softcap, alibi_slopes, dropout_p, head_dim)
    group = q_heads // kv_heads
    runtime = (float(scale), float(softcap), _diag_offset(q, k, bottom_right), int(window), float(dropout_p),
               seed, rng_lo, rng_hi)

    delta = torch.empty((batch, q_heads, tq), dtype=torch.float32, device=q.device)
    _flash_bwd_preprocess_kernel[(triton.cdiv(tq, config_q.block_m), batch * q_heads)](
        out, grad_out, lse, delta, *out.stride(), *grad_out.stride(), q_heads, tq,
        BLOCK_M=config_q.block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=spec["HEAD_DIM_PAD"],
        num_warps=config_q.num_warps,
    )

    ds_t = ds_full if ds_full is not None else q
    stride_ds = ds_full.stride() if ds_full is not None else (0, 0, 0, 0)
    _flash_bwd_dkdv_kernel[(triton.cdiv(tk, config_kv.block_n), batch * kv_heads)](
        q, k, v, bias_t, slopes, grad_out, lse, delta, dk, dv, ds_t,
        *q.stride(), *k.stride(), *v.stride(), *stride_b, *stride_s, *grad_out.stride(),
        *dk.stride(), *dv.stride(), *stride_ds,
        q_heads, kv_heads, group, tq, tk, *runtime,
        BLOCK_M=config_kv.block_m, BLOCK_N=config_kv.block_n, WRITE_DS=ds_full is not None, **spec,
        num_warps=config_kv.num_warps, num_stages=config_kv.num_stages,
    )
    _flash_bwd_dq_kernel[(triton.cdiv(tq, config_q.block_m), batch * q_heads)](
        q, k, v, bias_t, slopes, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *stride_b, *stride_s, *grad_out.stride(), *dq.stride(),
        q_heads, group, tq, tk, *runtime,
        BLOCK_M=config_q.block_m, BLOCK_N=config_q.block_n, **spec,
        num_warps=config_q.num_warps, num_stages=config_q.num_stages,
    )
    if ds_full is not None:
        dbias = ds_full if ds_full.dtype == bias.dtype and tuple(bias.shape) == ds_full.shape \
            else ds_full.sum_to_size(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias
