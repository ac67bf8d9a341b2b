"""GPU checks of the op boundary (issues 10, 18): Inductor launches the kernels (the default since the kernels cast
their float scalars to fp32: Inductor types them fp64), CUDA graphs capture the ops, devices are normalized. Every test here needs CUDA (`pytest -m gpu tests/lowering/test_cuda.py`)."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnlower
import attnlower.ops as public
from attnlower.compiler.backend import attnlower_backend  # the callable: works without the entry point installed

pytestmark = pytest.mark.gpu


def _qkv(b=2, hq=8, hkv=2, t=256, d=64, dtype=torch.bfloat16, requires_grad=False):
    return [torch.randn(b, h, t, d, device="cuda", dtype=dtype, requires_grad=requires_grad)
            for h in (hq, hkv, hkv)]


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


@pytest.fixture
def inductor_kernels(monkeypatch):
    """The default since 2026-12-03 (ATTNLOWER_INDUCTOR_KERNELS=0 turns it off): set it in case the environment did."""
    from attnlower.lowering import ops as lowering_ops

    monkeypatch.setattr(lowering_ops, "INDUCTOR_KERNELS", True)


def test_inductor_output_code_launches_the_kernels(inductor_kernels):
    from torch._inductor.utils import run_and_get_code

    q, k, v = _qkv(requires_grad=True)
    fn = torch.compile(lambda q, k, v: public.flash_attention(q, k, v, causal=True), fullgraph=True)
    out, (code, *rest) = run_and_get_code(fn, q, k, v)
    assert "_flash_fwd_kernel" in code, code[-3000:]
    assert "torch.ops.attnlower.flash_attention" not in code  # no per-call Python op dispatch
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_attnlower_backend_output_code_launches_the_kernels(inductor_kernels):
    from torch._inductor.utils import run_and_get_code

    q, k, v = _qkv(hkv=8)

    def manual(q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v

    fn = torch.compile(manual, backend=attnlower_backend)
    out, codes = run_and_get_code(fn, q, k, v)
    assert any("_flash_fwd_kernel" in c for c in codes), codes
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_eager_ops_capture_and_replay_in_a_cuda_graph(dropout_p):
    q, k, v = _qkv()
    static_out = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile the kernels, fill the caches) off-graph
        for _ in range(2):
            public.flash_attention(q, k, v, causal=True, dropout_p=dropout_p)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = public.flash_attention(q, k, v, causal=True, dropout_p=dropout_p)
    q.copy_(torch.randn_like(q))
    graph.replay()
    first = static_out.clone()
    graph.replay()
    if dropout_p == 0:
        torch.testing.assert_close(first, _sdpa(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)
        assert torch.equal(first, static_out)
    else:  # the seed is drawn inside the graph: each replay draws a new mask
        assert not torch.equal(first, static_out)


def test_paged_decode_captured_and_replayed_with_new_lengths():
    cache = attnlower.PagedKVCache(num_blocks=64, block_size=16, num_kv_heads=2, head_dim=64,
                                   dtype=torch.bfloat16, device="cuda")
    ids = [cache.add_sequence() for _ in range(4)]
    for seq, n in zip(ids, (100, 37, 250, 1)):
        kv = torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16)  # lands on cuda:0
        cache.append(seq, kv, kv)
    table, lens = cache.block_table(ids, max_blocks=16), cache.seq_lens(ids)
    q = torch.randn(4, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    run = lambda: public.paged_attention(q, cache.k_pool, cache.v_pool, table, lens)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    lens.copy_(torch.tensor([90, 37, 200, 1], dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(static_out, run(), atol=0, rtol=0)
    attnlower.check_errors()


# A training step under reduce-overhead, the way a training loop writes it: the gradients are reset each step. On
# 2026-12-02 this test accumulated into q.grad across steps, and the leaf's .grad was the backward graph's output,
# which the next replay overwrites ("a tensor output of CUDAGraphs that has been overwritten by a subsequent run"):
# the test's premise, not the op's (any op fails so; an optimizer's zero_grad(set_to_none=True) avoids it).
def test_inductor_cuda_graphs_reduce_overhead_training_step():
    q, k, v = _qkv(requires_grad=True)

    def step(q, k, v):
        return public.flash_attention(q, k, v, causal=True).float().square().sum()

    fn = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        q.grad = k.grad = v.grad = None
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        loss = fn(q, k, v)
        loss.backward()
    got = [loss.detach().clone()] + [t.grad.clone() for t in (q, k, v)]
    q.grad = k.grad = v.grad = None
    want = _sdpa(q, k, v, is_causal=True).float().square().sum()
    want.backward()
    torch.testing.assert_close(got[0], want.detach(), atol=1e-1, rtol=2e-2)
    for grad, t in zip(got[1:], (q, k, v)):
        torch.testing.assert_close(grad, t.grad, atol=5e-2, rtol=5e-2)


def test_attnlower_backend_under_inductor_cuda_graphs():
    import torch._inductor.config as inductor_config

    q, k, v = _qkv(hkv=8)

    def manual(q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.softmax(scores, dim=-1) @ v

    with inductor_config.patch({"triton.cudagraphs": True}):
        fn = torch.compile(manual, backend=attnlower_backend)
        for _ in range(3):
            out = fn(q, k, v)
    torch.testing.assert_close(out, _sdpa(q, k, v), atol=2e-2, rtol=2e-2)


def test_paged_cache_accepts_tensors_on_cuda_0():
    cache = attnlower.PagedKVCache(num_blocks=4, block_size=4, num_kv_heads=1, head_dim=8, device="cuda")
    assert cache.device == torch.device("cuda", torch.cuda.current_device())
    kv = torch.zeros(1, 1, 3, 8, device="cuda:0", dtype=torch.float16)
    cache.append(cache.add_sequence(), kv, kv)
