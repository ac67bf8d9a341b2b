"""Pieces every attention kernel shares: constants, tile loads, the dot-precision policy, the soft-cap
tanh and the online-softmax update. The dense kernels (flash_fwd.py, flash_bwd.py) import them; the
paged kernel can too (its own copies predate this module).

Symbols:
  s            scores in log2 units: s = log2(e) * score, so exp(score) = exp2(s)
  m_i, l_i     running row max of s (-inf while a row has seen no visible key) and running
               sum of exp2(s - m_i)
  DOT_PRECISION  an int code (DOT_TF32 / DOT_IEEE / DOT_UPCAST_IEEE, plan.DOT_CODES): tl.dot's
               input_precision for fp32 operands ("ieee" / "tf32"), or "upcast_ieee":
               convert both operands to fp32 first and multiply exactly. 16-bit operands ignore
               "ieee" / "tf32" (tensor cores multiply them exactly, accumulating in fp32).
               "upcast_ieee" exists for Triton's interpreter, whose tl.dot multiplies bf16 as raw
               uint16 bits; the products of the (already rounded) values are the same.
               Which one a call gets is the plan's choice (plan.dense_dot_precision).
"""
import triton
import triton.language as tl

# tl.constexpr(...) values (not just annotations) so that other kernel modules can import them: the
# JIT accepts a global only when the value itself is a constexpr or its own module annotates it so.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# DOT_PRECISION codes (dense kernels): 0 "tf32" (Triton's default for 16-bit inputs too), 1 "ieee",
# 2 upcast both operands to fp32, then "ieee" (Triton's interpreter: its bf16 tl.dot is wrong).
DOT_TF32 = tl.constexpr(0)
DOT_IEEE = tl.constexpr(1)
DOT_UPCAST_IEEE = tl.constexpr(2)


@triton.jit
def _as_fp32(x):
    """A runtime float argument as fp32, once at kernel entry.

    Triton's own launcher types a Python float argument fp32; Inductor, when it launches a kernel itself
    (triton_op / wrap_triton), types it fp64 (H200, torch 2.11: 'sm_scale': 'fp64'). An fp64 scalar then
    promotes every score and the accumulator to fp64, and tl.dot's fp32 accumulator check fails
    (tests/lowering/test_sm90_compile.py compiles every kernel with fp64 scalars so this cannot come back).
    """
    return tl.cast(x, tl.float32)


@triton.jit
def _load_tile(ptrs, offs_r, offs_c, n_r, n_c, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Load a 2-D tile, masking rows >= n_r and columns >= n_c only where the constexprs say a
    tile can cross those bounds (interior tiles load unmasked)."""
    if MASK_R:
        if MASK_C:
            t = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
        else:
            t = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    else:
        if MASK_C:
            t = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) with fp32 accumulation; see DOT_PRECISION in the header.

    An int, not a string: Inductor re-emits the constexprs of kernels it launches itself (triton_op), and
    a string constexpr reached tl.dot's input_precision check wrongly there (H200, torch 2.11)."""
    if DOT_PRECISION == DOT_UPCAST_IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_PRECISION == DOT_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _tanh(x):
    # tanh through exp2 (libdevice's tanh is CUDA-only, and the interpreter must run this too):
    # overflows cleanly to +-1 for large |x|; absolute error ~1 ulp near 0, which is what the
    # scores need (they are later multiplied by softcap, not divided).
    e = tl.math.exp2(x * (2.0 * LOG2E))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """One key block of the online softmax: s [M, N] (log2 units, -inf where masked).

    Returns (p, alpha, m_new, l_new): p = exp2(s - m_new) unnormalized, alpha = exp2(m_i - m_new)
    the factor the caller rescales its accumulator by, and the updated running max and sum.
    -inf-safe: a row with nothing visible yet keeps m = -inf; 0 is subtracted instead, so that
    exp2(-inf - -inf) never makes a NaN that later blocks would carry along.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new
