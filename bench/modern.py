"""Issue 21 on a GPU: MLA head dims, attention sinks and packed documents, a row group per feature.

    python bench/modern.py                      # GPU, bf16, every group; $OUT/modern.json when OUT is set
    python bench/modern.py --groups packed      # some of: mla decode sinks packed
    python bench/modern.py --smoke              # CPU (Triton's interpreter), tiny odd fp32 shapes: the script end
                                                # to end with its checks, times nothing

Every candidate is first checked against a float32 reference built from the same inputs: its output and, where it
has a backward, the gradients of its inputs for one fixed grad_out, max |err| / max |ref| within TOLERANCE. A wrong
candidate is reported "wrong: ..." in its row instead of a time; one that refuses the shape, with its error (and
the warning that said why: SDPA's backends warn before "No available kernel"). The rest are timed with
triton.testing.do_bench (median ms). Ratios: each candidate's time over attnlower's (> 1: attnlower is faster).

  mla     MLA prefill at DeepSeek-V3's head dims (Dqk 192 = 128 nope + 64 rope, Dv 128), H 16, causal, B=4 T=1024
          and B=1 T=4096, fwd and fwd+bwd: flash_attention vs SDPA (flash / cuDNN / efficient) vs FlexAttention.
  decode  MLA decode through paged_attention (Tq 1, L 4096, cache block 64, B 1 and 32) in two forms, scale
          1/sqrt(192) in both, vs SDPA (each backend, math included) on an already contiguous cache:
            absorbed   what DeepSeek-V3 serves: one latent KV head (Hkv 1) shared by Hq 128 query heads, keys the
                       whole latent row (Dqk 576 = 512 kv_lora_rank + 64 rope), values its first 512 dims (the same
                       pool, a prefix view); SDPA gets the query heads as query rows of the one KV head;
            expanded   the latent up-projected per head: Hkv = Hq = 16, Dqk 192, Dv 128, K and V pools of their own.
  sinks   GPT-OSS attention sinks (one logit per query head in the softmax denominator, trained: it gets a gradient),
          Hq 64, Hkv 8, D 64, B 1, T 4096, causal and sliding window 128, fwd and fwd+bwd: flash_attention /
          sliding_window_attention(sinks=) vs HF's eager GPT-OSS attention (a sink column joins the scores, softmax,
          the column dropped) vs FlexAttention, whose logsumexp folds the sink in: out * sigmoid(lse - sink).
  packed  T 8192 tokens packed from documents of seeded random lengths 64..2048 (the last takes what is left), H 16,
          D 128, causal within each document, nothing across: flash_attention(doc_ids=) ("attnlower") vs the same
          mask as a dense bool bias (the dense-bias path; alone, and with causal=True on top) vs each document one
          by one through flash_attention(causal=True) (the whole loop timed) vs SDPA with the dense mask vs
          FlexAttention with a document BlockMask; fwd, fwd+bwd, and for attnlower's four "fwd graph": the forward
          replayed from a CUDA graph (GPU time alone: the one-by-one loop's launches do not count against it).
          Then the issue's targets per mode: doc_ids >= 2x faster than the dense bias, and <= 1.10x one by one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = ("mla", "decode", "sinks", "packed")
# max |err| / max |ref| against the float32 reference. bf16: attnlower's kernels and SDPA's measured 2e-3 .. 6e-3
# against float64 on the H200, a racing dK tile 1e-1 and more (bench/RESULTS.md, bwd_tiles_repro.py, 2026-12-04).
# fp32 (the smoke: the interpreter's dots are IEEE) agrees to ~1e-6.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-3}
# issue 21's packed-documents targets: doc_ids at least 2x faster than the dense bias, within 10% of one by one
PACKED_MIN_SPEEDUP_OVER_BIAS = 2.0
PACKED_MAX_RATIO_TO_ONE_BY_ONE = 1.10


class DecodeForm(NamedTuple):
    """One MLA decode layout: q·k over `dqk` dims, `dv` value dims; `v_in_k`: the values are the first dv dims of
    the keys (absorbed MLA: one latent pool, viewed, no copy), else a pool of their own."""
    name: str
    dqk: int
    dv: int
    q_heads: int
    kv_heads: int
    v_in_k: bool


@dataclass(frozen=True)
class Shapes:
    """Every group's sizes: GPU (bf16, the issue's shapes) and SMOKE (the interpreter: tiny, odd, fp32)."""
    dtype: torch.dtype
    mla_heads: int
    mla_dims: tuple[int, int]                  # (Dqk, Dv); MLA's softmax scale is Dqk ** -0.5, decode's too
    mla_cases: tuple[tuple[int, int], ...]     # (B, T)
    decode_forms: tuple[DecodeForm, ...]
    decode_batches: tuple[int, ...]
    decode_length: int
    decode_block: int
    sinks: tuple[int, int, int, int, int]      # (B, Hq, Hkv, T, D)
    sinks_window: int
    packed: tuple[int, int, int]               # (T, H, D)
    packed_doc_lengths: tuple[int, int]        # (shortest, longest) document drawn


GPU = Shapes(dtype=torch.bfloat16, mla_heads=16, mla_dims=(192, 128), mla_cases=((4, 1024), (1, 4096)),
             decode_forms=(DecodeForm("absorbed", 576, 512, 128, 1, True),
                           DecodeForm("expanded", 192, 128, 16, 16, False)),
             decode_batches=(1, 32), decode_length=4096, decode_block=64,
             sinks=(1, 64, 8, 4096, 64), sinks_window=128, packed=(8192, 16, 128), packed_doc_lengths=(64, 2048))
SMOKE = Shapes(dtype=torch.float32, mla_heads=2, mla_dims=(24, 16), mla_cases=((2, 37),),
               decode_forms=(DecodeForm("absorbed", 40, 32, 8, 1, True), DecodeForm("expanded", 24, 16, 2, 2, False)),
               decode_batches=(1, 3), decode_length=37, decode_block=4,
               sinks=(1, 4, 2, 37, 16), sinks_window=8, packed=(70, 2, 16), packed_doc_lengths=(5, 24))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks the script")
    p.add_argument("--profile", default="", help="comma-separated candidates (e.g. attnlower,flex) whose timed modes "
                   "also get GPU time per kernel (torch.profiler, 5 calls): printed and kept in the rows")
    args = p.parse_args(argv)
    args.groups = [g for g in args.groups.split(",") if g]
    args.profile = {name for name in args.profile.split(",") if name}
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown group(s) {unknown}; expected some of {list(GROUPS)}")
    if args.smoke:
        # before triton is imported: it decides at decoration time whether kernels run interpreted; and the ops run
        # the Triton kernels on CPU only when asked (else lowering/reference.py, which this script does not check)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("ATTNLOWER_CPU_KERNELS", "triton")
    elif not torch.cuda.is_available():
        p.error("bench/modern.py times kernels on a GPU and sees none; for the CPU check run --smoke")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Candidates and their checks

@dataclass
class Runs:
    """A candidate ready to check and time: `forward` (timed) and `output` (its result as one tensor, checked);
    `backward` (forward + backward with the case's grad_out, timed) and `grads` (runs it once and returns the input
    gradients, checked), None for a forward-only candidate."""
    forward: Callable[[], object]
    output: Callable[[], Tensor]
    backward: Callable[[], None] | None = None
    grads: Callable[[], list[Tensor]] | None = None


def autograd_runs(attend, inputs: list[Tensor], grad_out: Tensor | None = None) -> Runs:
    """Runs of a differentiable `attend(*inputs)`, as bench/_common.autograd_fns makes them (forward under no_grad;
    forward + backward on leaf copies whose grads are cleared each time), except that any input can be a leaf (the
    sinks too) and grad_out is the check's, so the gradients can be compared. grad_out None: forward only."""
    def forward():
        with torch.no_grad():
            return attend(*inputs)

    if grad_out is None:
        return Runs(forward, forward)
    leaves = [x.detach().requires_grad_() for x in inputs]

    def backward():
        for leaf in leaves:
            leaf.grad = None
        attend(*leaves).backward(grad_out)

    def grads():
        backward()
        return [leaf.grad for leaf in leaves]
    return Runs(forward, forward, backward, grads)


def one_by_one_runs(attend, inputs: list[Tensor], grad_out: Tensor, lengths: list[int]) -> Runs:
    """Each document alone: `attend(*its slices)` in a loop, the slices cut along T (dim 2) into contiguous copies
    here, outside the timing; outputs and gradients are concatenated back for the check only."""
    bounds = list(itertools.pairwise([0, *itertools.accumulate(lengths)]))

    def cut(x):
        return [x[:, :, start:end].contiguous() for start, end in bounds]

    documents = list(zip(*(cut(x) for x in inputs)))
    leaves = [[x.detach().requires_grad_() for x in document] for document in documents]
    grad_outs = cut(grad_out)

    def forward():
        with torch.no_grad():
            return [attend(*document) for document in documents]

    def backward():
        for document, g in zip(leaves, grad_outs):
            for leaf in document:
                leaf.grad = None
            attend(*document).backward(g)

    def grads():
        backward()
        return [torch.cat([document[i].grad for document in leaves], dim=2) for i in range(len(inputs))]
    return Runs(forward, lambda: torch.cat(forward(), dim=2), backward, grads)


def relative_errors(got: list[Tensor | None], want: list[Tensor], names: list[str]) -> dict[str, float]:
    """max |got - want| / max |want| per tensor; inf for a missing tensor or a shape that differs, nan for a NaN."""
    errors = {}
    for name, g, w in zip(names, got, want):
        if g is None or tuple(g.shape) != tuple(w.shape):
            errors[name] = math.inf
            continue
        g, w = g.detach().float(), w.detach().float()
        errors[name] = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
    return errors


def verdict(errors: dict[str, float], tolerance: float) -> str | None:
    """None when every error is within tolerance, else the "wrong: ..." its rows report instead of a time."""
    bad = {name: e for name, e in errors.items() if not e <= tolerance}   # NaN is bad too
    if not bad:
        return None
    listed = ", ".join(f"{name} {e:.3g}" for name, e in bad.items())
    return f"wrong: max |err| / max |ref| {listed} > {tolerance:g}"


def describe(error: BaseException, caught: list) -> str:
    """One line for a refusal: the exception, and the warnings raised on the way, which say why (SDPA warns "Flash
    attention kernel not used because:", then the reason, before raising "No available kernel")."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:160] if lines else ''}"
    why = " ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()))
    return text + (f" (warned: {why[:240]})" if why else "")


class Expected(NamedTuple):
    """The reference's results: the output, and the input gradients (None for a forward-only case) with names."""
    out: Tensor
    grads: list[Tensor] | None
    names: list[str]


def expected(reference: Runs, names: list[str]) -> Expected:
    return Expected(reference.output().detach(), None if reference.grads is None else
                    [g.detach() for g in reference.grads()], names)


class Candidate(NamedTuple):
    """A named way to compute the case: `make()` builds its Runs (inside the check: a refusal there is reported);
    `modes` are those it is timed in, of "fwd", "fwd graph" (needs a CUDA graph) and "fwd+bwd"."""
    name: str
    make: Callable[[], Runs]
    modes: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------
# The run: device, dtype, timers, and how each candidate is checked, then timed

@dataclass
class Bench:
    """What every group needs: the shapes, the device, the timers, SDPA's backends and how FlexAttention runs."""
    shapes: Shapes
    smoke: bool
    profile: frozenset = frozenset()   # candidates whose timed modes also get a per-kernel profile

    def __post_init__(self):
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.tolerance = TOLERANCE[self.shapes.dtype]
        from torch.nn.attention import SDPBackend

        self.math = SDPBackend.MATH
        # the CPU has no cuDNN / efficient kernels: the smoke runs the math backend in their place
        self.sdpa_backends = ({"sdpa-math": SDPBackend.MATH} if self.smoke else
                              {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                               "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION})

    def randn(self, *shape, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, device=self.device) * scale).to(self.shapes.dtype)

    def time_ms(self, fn, mode: str) -> float:
        """Median ms (triton.testing.do_bench; "fwd graph": do_bench_cudagraph). Smoke: the mean wall time of two
        plain calls in the interpreter, which measures nothing and only keeps the ratios finite."""
        if self.smoke:
            start = time.perf_counter()
            fn()
            fn()
            return (time.perf_counter() - start) * 500.0
        import triton

        timer = triton.testing.do_bench_cudagraph if mode == "fwd graph" else triton.testing.do_bench
        return timer(fn, return_mode="median")

    def kernels(self, fn, calls: int = 5) -> list[tuple[str, float]]:
        """GPU time per call of each kernel `fn` launches ([(name, us)], largest first; torch.profiler over `calls`
        calls after one warm-up): where a candidate's time goes."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        if not self.smoke:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([] if self.smoke else [ProfilerActivity.CUDA])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            if not self.smoke:
                torch.cuda.synchronize()
        attr = "self_device_time_total" if not self.smoke else "self_cpu_time_total"
        rows = [(e.key, getattr(e, attr, 0.0) / calls) for e in prof.key_averages()]
        rows = [(name, us) for name, us in rows if us > 0 and (self.smoke or not name.startswith("aten::"))]
        return sorted(rows, key=lambda r: -r[1])[:12]

    def compiled(self, fn):
        """`fn` (which calls flex_attention) through torch.compile on a GPU; eager in the smoke (FlexAttention's
        eager forward runs on CPU, its backward does not: the smoke's flex fwd+bwd reports that refusal)."""
        if self.smoke:
            return fn
        # one shape per compile: without the reset Dynamo's recompile limit (8) sends later shapes to eager
        torch._dynamo.reset()
        return torch.compile(fn)

    def release(self):
        if not self.smoke:
            torch.cuda.empty_cache()


def measure(bench: Bench, candidate: Candidate, want: Expected) -> list[dict]:
    """Check `candidate` against `want`, then time each of its modes: one result per mode, {"mode", "ms", "err"}
    when it is right, {"mode", "error"} ("wrong: ..." or the refusal) when not. The forward is checked once for its
    forward modes, the gradients for "fwd+bwd"."""
    forward_modes = [m for m in candidate.modes if m != "fwd+bwd"]
    backward_modes = [m for m in candidate.modes if m == "fwd+bwd"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runs = candidate.make()
            errors = relative_errors([runs.output()], [want.out], ["out"])
            refusal = verdict(errors, bench.tolerance)
        except Exception as e:  # noqa: BLE001 - a backend refusing a shape is a result, not a crash
            return [{"mode": m, "error": describe(e, caught)} for m in candidate.modes]
    results = []
    for mode in forward_modes:
        results.append(_timed(bench, runs.forward, mode, errors, refusal))
        _profiled(bench, candidate, runs.forward, results[-1])
    for mode in backward_modes:
        if refusal is not None:      # a wrong forward: the gradients of a wrong function are not timed either
            results.append({"mode": mode, "error": refusal, "err": errors})
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                grad_errors = relative_errors(runs.grads(), want.grads, want.names)
            except Exception as e:  # noqa: BLE001 - no backward for this shape (e.g. FlexAttention on CPU)
                results.append({"mode": mode, "error": describe(e, caught)})
                continue
        results.append(_timed(bench, runs.backward, mode, {**errors, **grad_errors},
                              verdict(grad_errors, bench.tolerance)))
        _profiled(bench, candidate, runs.backward, results[-1])
    return results


def _profiled(bench: Bench, candidate: Candidate, fn, result: dict) -> None:
    """With --profile naming this candidate and the mode timed: its kernels, GPU us per call, into the row."""
    if candidate.name in bench.profile and "ms" in result and result["mode"] != "fwd graph":
        result["kernels"] = bench.kernels(fn)
        print(f"    {candidate.name} {result['mode']} kernels (us per call): " +
              ", ".join(f"{name[:60]} {us:.1f}" for name, us in result["kernels"]), flush=True)


def _timed(bench: Bench, fn, mode: str, errors: dict, refusal: str | None) -> dict:
    if refusal is not None:
        return {"mode": mode, "error": refusal, "err": errors}
    try:
        return {"mode": mode, "ms": bench.time_ms(fn, mode), "err": errors}
    except Exception as e:  # noqa: BLE001 - e.g. a candidate a CUDA graph cannot capture: reported in its row
        return {"mode": mode, "error": describe(e, []), "err": errors}


def run_case(bench: Bench, group: str, case: str, shape: dict, reference: Runs, names: list[str],
             candidates: list[Candidate]) -> list[dict]:
    """The rows of one case: the reference computed once, then every candidate checked and timed."""
    want = expected(reference, names)
    rows = []
    for candidate in candidates:
        for result in measure(bench, candidate, want):
            rows.append({"group": group, "case": case, **shape, "impl": candidate.name, **result})
            r = rows[-1]
            print(f"  {group} {case} {candidate.name} {r['mode']}: " +
                  (f"{r['ms']:.4f} ms" if "ms" in r else r["error"]), flush=True)
    return rows


def sdpa_attend(backend, **kwargs):
    """attend(q, k, v) through F.scaled_dot_product_attention with one backend allowed."""
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return attend


def causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def block_mask(bench: Bench, mask_mod, length: int):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, None, length, length, device=bench.device)


def flex_attend(bench: Bench, mask, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return bench.compiled(lambda q, k, v: flex_attention(q, k, v, block_mask=mask, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# The groups

def mla_rows(bench: Bench) -> list[dict]:
    """MLA prefill: Dqk != Dv, causal, fwd and fwd+bwd."""
    import attnlower.ops as ops

    dqk, dv = bench.shapes.mla_dims
    heads, scale, rows = bench.shapes.mla_heads, bench.shapes.mla_dims[0] ** -0.5, []
    for batch, length in bench.shapes.mla_cases:
        torch.manual_seed(0)
        inputs = [bench.randn(batch, heads, length, dqk), bench.randn(batch, heads, length, dqk),
                  bench.randn(batch, heads, length, dv)]
        grad_out = bench.randn(batch, heads, length, dv)
        reference = autograd_runs(sdpa_attend(bench.math, is_causal=True, scale=scale), [x.float() for x in inputs],
                                  grad_out.float())
        both = ("fwd", "fwd+bwd")
        candidates = [Candidate("attnlower", lambda: autograd_runs(
            lambda q, k, v: ops.flash_attention(q, k, v, causal=True, scale=scale), inputs, grad_out), both)]
        candidates += [Candidate(name, lambda backend=backend: autograd_runs(
            sdpa_attend(backend, is_causal=True, scale=scale), inputs, grad_out), both)
            for name, backend in bench.sdpa_backends.items()]
        candidates.append(Candidate("flex", lambda: autograd_runs(
            flex_attend(bench, block_mask(bench, causal_mask_mod, length), scale=scale), inputs, grad_out), both))
        shape = dict(B=batch, T=length, H=heads, Dqk=dqk, Dv=dv)
        rows += run_case(bench, "mla", f"B={batch} T={length}", shape, reference, ["dq", "dk", "dv"], candidates)
        del inputs, grad_out, reference, candidates
        bench.release()
    return rows


def decode_inputs(bench: Bench, form: DecodeForm, batch: int):
    """q [B, Hq, 1, Dqk], the k pool [N, Hkv, block, Dqk], the v pool (a prefix view of k's when v_in_k), a shuffled
    block table [B, ceil(L / block)] int32 and the lengths [B] int32 (every sequence L long)."""
    length, block = bench.shapes.decode_length, bench.shapes.decode_block
    blocks_per_seq = -(-length // block)
    num_blocks = batch * blocks_per_seq
    k_pool = bench.randn(num_blocks, form.kv_heads, block, form.dqk)
    v_pool = k_pool[..., :form.dv] if form.v_in_k else bench.randn(num_blocks, form.kv_heads, block, form.dv)
    table = torch.randperm(num_blocks, device=bench.device).to(torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), length, dtype=torch.int32, device=bench.device)
    return bench.randn(batch, form.q_heads, 1, form.dqk), k_pool, v_pool, table, lens


def contiguous_cache(pool: Tensor, table: Tensor, length: int) -> Tensor:
    """[N, Hkv, block, X] gathered through the block table -> contiguous [B, Hkv, length, X]."""
    batch = table.shape[0]
    gathered = pool[table.long()].permute(0, 2, 1, 3, 4).reshape(batch, pool.shape[1], -1, pool.shape[3])
    return gathered[:, :, :length].contiguous()


def decode_sdpa(backend, k: Tensor, v: Tensor, scale: float, heads_as_rows: bool):
    """attend(q) by SDPA over a contiguous cache. heads_as_rows (one KV head): q [B, Hq, 1, D] goes in as [B, 1, Hq,
    D], every query head a query row of the one KV head, the way MQA decode runs without repeating the latent."""
    attend = sdpa_attend(backend, scale=scale)

    def decode(q):
        if not heads_as_rows:
            return attend(q, k, v)
        return attend(q.transpose(1, 2), k, v).transpose(1, 2)
    return decode


def decode_rows(bench: Bench) -> list[dict]:
    """MLA decode through paged_attention, absorbed and expanded, forward only (the op has no autograd)."""
    import attnlower.ops as ops

    from torch.nn.attention import SDPBackend

    scale, length, rows = bench.shapes.mla_dims[0] ** -0.5, bench.shapes.decode_length, []
    backends = dict(bench.sdpa_backends)
    backends.setdefault("sdpa-math", SDPBackend.MATH)   # the backend that takes 576 dims on a GPU
    for form, batch in itertools.product(bench.shapes.decode_forms, bench.shapes.decode_batches):
        torch.manual_seed(0)
        q, k_pool, v_pool, table, lens = decode_inputs(bench, form, batch)
        k = contiguous_cache(k_pool, table, length)
        v = k[..., :form.dv] if form.v_in_k else contiguous_cache(v_pool, table, length)
        as_rows = form.kv_heads == 1
        reference = autograd_runs(decode_sdpa(bench.math, k.float(), v.float(), scale, as_rows), [q.float()])
        candidates = [Candidate("attnlower", lambda: autograd_runs(
            lambda q_: ops.paged_attention(q_, k_pool, v_pool, table, lens, scale=scale), [q]), ("fwd",))]
        candidates += [Candidate(name, lambda backend=backend: autograd_runs(
            decode_sdpa(backend, k, v, scale, as_rows), [q]), ("fwd",)) for name, backend in backends.items()]
        shape = dict(form=form.name, B=batch, L=length, Hq=form.q_heads, Hkv=form.kv_heads, Dqk=form.dqk, Dv=form.dv,
                     block=bench.shapes.decode_block)
        rows += run_case(bench, "decode", f"{form.name} B={batch}", shape, reference, [], candidates)
        del q, k_pool, v_pool, k, v, reference, candidates
        bench.release()
    return rows


def eager_sinks(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, mask: Tensor, scale: float) -> Tensor:
    """HF's eager GPT-OSS attention (transformers' modeling_gpt_oss.eager_attention_forward, dropout 0): K/V repeated
    for GQA, the additive mask added, a sink column joins the scores, softmax in the scores' dtype, column dropped."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + mask
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], -1).to(scores.dtype)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    return torch.matmul(probs[..., :-1], v)


def flex_sinks(bench: Bench, mask, scale: float):
    """attend(q, k, v, sinks) by FlexAttention: its output over its logsumexp Z has no sink; with one, every weight
    is divided by Z + exp(sink) instead of Z, so out * Z / (Z + exp(sink)) = out * sigmoid(lse - sink)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    def attend(q, k, v, sinks):
        out, aux = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True,
                                  return_aux=AuxRequest(lse=True))
        keep = torch.sigmoid(aux.lse.float() - sinks.float()[None, :, None])
        return (out.float() * keep[..., None]).to(q.dtype)
    return bench.compiled(attend)


def sinks_rows(bench: Bench) -> list[dict]:
    """GPT-OSS sinks, causal and within a sliding window, fwd and fwd+bwd (the sinks get a gradient too)."""
    import attnlower.ops as ops

    batch, q_heads, kv_heads, length, head_dim = bench.shapes.sinks
    scale, rows = head_dim ** -0.5, []
    for window in (0, bench.shapes.sinks_window):
        torch.manual_seed(0)
        inputs = [bench.randn(batch, q_heads, length, head_dim), bench.randn(batch, kv_heads, length, head_dim),
                  bench.randn(batch, kv_heads, length, head_dim), bench.randn(q_heads, scale=2.0)]
        grad_out = bench.randn(batch, q_heads, length, head_dim)
        i = torch.arange(length, device=bench.device)
        keep = i[None, :] <= i[:, None]
        if window:
            keep &= i[:, None] - i[None, :] < window

        def additive(dtype):   # HF's 4D mask: 0 where attended, the dtype's minimum elsewhere
            return torch.zeros(keep.shape, dtype=dtype, device=bench.device).masked_fill(
                ~keep, torch.finfo(dtype).min)[None, None]
        mask, mask32 = additive(bench.shapes.dtype), additive(torch.float32)
        reference = autograd_runs(lambda q, k, v, s: eager_sinks(q, k, v, s, mask32, scale),
                                  [x.float() for x in inputs], grad_out.float())

        def attnlower(q, k, v, s, window=window):
            if window:
                return ops.sliding_window_attention(q, k, v, window, scale=scale, sinks=s)
            return ops.flash_attention(q, k, v, causal=True, scale=scale, sinks=s)

        def flex_mask(b, h, q_idx, kv_idx, window=window):
            visible = kv_idx <= q_idx
            return visible & (q_idx - kv_idx < window) if window else visible
        both = ("fwd", "fwd+bwd")
        candidates = [
            Candidate("attnlower", lambda: autograd_runs(attnlower, inputs, grad_out), both),
            Candidate("hf-eager", lambda: autograd_runs(lambda q, k, v, s: eager_sinks(q, k, v, s, mask, scale),
                                                        inputs, grad_out), both),
            Candidate("flex", lambda: autograd_runs(flex_sinks(bench, block_mask(bench, flex_mask, length), scale),
                                                    inputs, grad_out), both)]
        case = f"window={window}" if window else "causal"
        shape = dict(B=batch, T=length, Hq=q_heads, Hkv=kv_heads, D=head_dim, window=window)
        rows += run_case(bench, "sinks", case, shape, reference, ["dq", "dk", "dv", "dsinks"], candidates)
        del inputs, grad_out, mask, mask32, reference, candidates
        bench.release()
    return rows


def document_lengths(total: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Random lengths in [shortest, longest] (seeded) until they hold `total` tokens; the last takes what is left."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        drawn = int(torch.randint(shortest, longest + 1, (1,), generator=g))
        lengths.append(min(drawn, total - sum(lengths)))
    return lengths


def packed_rows(bench: Bench) -> list[dict]:
    """Packed documents: doc_ids vs the dense bias vs one by one vs SDPA (dense mask) vs FlexAttention."""
    import attnlower.ops as ops

    length, heads, head_dim = bench.shapes.packed
    lengths = document_lengths(length, *bench.shapes.packed_doc_lengths)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=bench.device)
    doc_ids = ops.doc_ids_from_cu_seqlens(cu_seqlens, length)              # [1, T]
    doc, i = doc_ids[0], torch.arange(length, device=bench.device)
    keep = ((doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None]))[None, None]   # [1, 1, T, T], True: attend
    torch.manual_seed(0)
    inputs = [bench.randn(1, heads, length, head_dim) for _ in range(3)]
    grad_out = bench.randn(1, heads, length, head_dim)
    reference = autograd_runs(sdpa_attend(bench.math, attn_mask=keep), [x.float() for x in inputs], grad_out.float())

    def flash(**kwargs):
        return lambda: autograd_runs(lambda q, k, v: ops.flash_attention(q, k, v, **kwargs), inputs, grad_out)

    def flex_mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
    three, both = ("fwd", "fwd graph", "fwd+bwd"), ("fwd", "fwd+bwd")
    candidates = [
        Candidate("attnlower", flash(causal=True, doc_ids=doc_ids), three),
        Candidate("attnlower-bias", flash(bias=keep), three),
        Candidate("attnlower-bias-causal", flash(bias=keep, causal=True), both),
        Candidate("attnlower-one-by-one", lambda: one_by_one_runs(
            lambda q, k, v: ops.flash_attention(q, k, v, causal=True), inputs, grad_out, lengths), three)]
    candidates += [Candidate(name, lambda backend=backend: autograd_runs(
        sdpa_attend(backend, attn_mask=keep), inputs, grad_out), both) for name, backend in bench.sdpa_backends.items()]
    candidates.append(Candidate("flex", lambda: autograd_runs(
        flex_attend(bench, block_mask(bench, flex_mask, length)), inputs, grad_out), both))
    shape = dict(T=length, H=heads, D=head_dim, documents=lengths)
    case = f"T={length} {len(lengths)} docs"
    return run_case(bench, "packed", case, shape, reference, ["dq", "dk", "dv"], candidates)


GROUP_ROWS = {"mla": mla_rows, "decode": decode_rows, "sinks": sinks_rows, "packed": packed_rows}


# ---------------------------------------------------------------------------------------------------------------
# Ratios, targets, tables

def add_ratios(rows: list[dict]) -> None:
    """Each timed row's time over attnlower's in the same group, case and mode (> 1: attnlower is faster)."""
    mine = {(r["group"], r["case"], r["mode"]): r["ms"] for r in rows if r["impl"] == "attnlower" and "ms" in r}
    for r in rows:
        base = mine.get((r["group"], r["case"], r["mode"]))
        if base and "ms" in r:
            r["vs_attnlower"] = r["ms"] / base


def packed_targets(rows: list[dict]) -> list[dict]:
    """Issue 21's two packed-documents targets per mode, where the three times exist."""
    ms = {(r["impl"], r["mode"]): r["ms"] for r in rows if r["group"] == "packed" and "ms" in r}
    targets = []
    for mode in ("fwd", "fwd graph", "fwd+bwd"):
        docs, bias, one = (ms.get((impl, mode)) for impl in ("attnlower", "attnlower-bias", "attnlower-one-by-one"))
        if docs is None:
            continue
        target = {"mode": mode, "doc_ids_ms": docs, "dense_bias_ms": bias, "one_by_one_ms": one}
        if bias is not None:
            target["speedup_over_dense_bias"] = bias / docs
            target["speedup_met"] = bias / docs >= PACKED_MIN_SPEEDUP_OVER_BIAS
        if one is not None:
            target["ratio_to_one_by_one"] = docs / one
            target["ratio_met"] = docs / one <= PACKED_MAX_RATIO_TO_ONE_BY_ONE
        targets.append(target)
    return targets


def print_group(group: str, rows: list[dict]) -> None:
    """One table per group: a line per (case, mode), a column per candidate, ms (other / attnlower); the refusals
    under it, each distinct one once."""
    rows = [r for r in rows if r["group"] == group]
    if not rows:
        return
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    cell = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    width = max(18, *(len(i) for i in impls))
    print(f"\n{group}: ms (time / attnlower's)")
    print(f"{'case':<20} {'mode':<9} " + " ".join(f"{i:>{width}}" for i in impls))
    for case, mode in lines:
        texts = []
        for impl in impls:
            r = cell.get((case, mode, impl))
            if r is None:
                texts.append("")
            elif "ms" not in r:
                texts.append("WRONG" if r["error"].startswith("wrong") else "error")
            elif impl == "attnlower":
                texts.append(f"{r['ms']:.4f}")
            else:
                texts.append(f"{r['ms']:.4f} ({r['vs_attnlower']:.2f}x)" if "vs_attnlower" in r else f"{r['ms']:.4f}")
        print(f"{case:<20} {mode:<9} " + " ".join(f"{t:>{width}}" for t in texts))
    refusals = list(dict.fromkeys((r["impl"], r["error"]) for r in rows if "error" in r))
    for impl, error in refusals:
        print(f"  {impl}: {error}")


def print_targets(targets: list[dict], smoke: bool) -> None:
    print(f"\npacked targets (issue 21): doc_ids >= {PACKED_MIN_SPEEDUP_OVER_BIAS:g}x faster than the dense bias, "
          f"doc_ids / one by one <= {PACKED_MAX_RATIO_TO_ONE_BY_ONE:.2f}" +
          ("  [smoke: interpreter wall times, meaningless]" if smoke else ""))
    for t in targets:
        speedup = (f"{t['speedup_over_dense_bias']:.2f}x ({'met' if t['speedup_met'] else 'NOT met'})"
                   if "speedup_over_dense_bias" in t else "-")
        ratio = (f"{t['ratio_to_one_by_one']:.2f} ({'met' if t['ratio_met'] else 'NOT met'})"
                 if "ratio_to_one_by_one" in t else "-")
        print(f"  {t['mode']:<9} vs dense bias {speedup:<16} vs one by one {ratio}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    bench = Bench(SMOKE if args.smoke else GPU, args.smoke, frozenset(args.profile))
    device = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    print(f"{device}  torch {torch.__version__}  triton {triton.__version__}  {bench.shapes.dtype}", flush=True)
    rows, seconds = [], {}
    for group in args.groups:
        start = time.perf_counter()
        rows += GROUP_ROWS[group](bench)
        seconds[group] = time.perf_counter() - start
        print(f"{group}: {seconds[group]:.1f} s (compiles included)", flush=True)
    add_ratios(rows)
    targets = packed_targets(rows)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "modern.json").write_text(json.dumps(
            dict(device=device, torch=torch.__version__, triton=triton.__version__, dtype=str(bench.shapes.dtype),
                 smoke=args.smoke, seconds=seconds, rows=rows, packed_targets=targets), indent=1))
    for group in args.groups:
        print_group(group, rows)
    if "packed" in args.groups:
        print_targets(targets, args.smoke)
    failed = [r for r in rows if r["impl"].startswith("attnlower") and "ms" not in r]
    for r in failed:
        print(f"attnlower FAILED: {r['group']} {r['case']} {r['impl']} {r['mode']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
