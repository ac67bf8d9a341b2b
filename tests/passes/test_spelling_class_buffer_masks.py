"""Issue 22, class 1: masks stored in module buffers.

nanoGPT / minGPT keep `register_buffer("bias", tril(ones(P, P)).view(1, 1, P, P))` and mask with
`bias[:, :, :T, :T] == 0`; transformers' GPT-2 (4.2x) and GPT-Neo slice a bool buffer bottom-right
(`bias[:, :, Tk - Tq : Tk, :Tk]`), GPT-Neo's local layers keep a band; x-transformers caches its ALiBi
bias in a buffer. At compile time the backend holds the buffer's value: the structure is proven from it
and lowered as that structure (causal / band / ALiBi slopes: blocks skipped, no dense bias), guarded
so that a buffer changed after compiling (in place, or reassigned) still gives eager's result.

Each test asserts the op and the spec the report shows (not "a dense bias") and, for the guard, that
the compiled callable follows the buffer's new value. Nothing here is skipped: most of these fail until
issue 22 lands (docs/design/issue22.md, class 1).
"""
from __future__ import annotations

import re

import pytest
import torch

import spellings_issue22 as S

FLASH, SLIDING = "flash_attention", "sliding_window_attention"
FROM_BUFFER = r"(?i)buffer"       # the report says the structure was proven from a buffer's value


def causal_site(site, bottom_right=False):
    S.assert_site(site, FLASH, mask="causal", causal=True, bottom_right=bottom_right, bias_kind="none")
    assert re.search(FROM_BUFFER, site.reason), f"the reason does not name the buffer:\n{S.describe([site])}"


# ---- nanoGPT / minGPT ----------------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_nanogpt_tril_buffer_is_causal(inner):
    torch.manual_seed(0)
    model = S.NanoGPTAttention().eval()
    _, sites = S.check_forward(model, S.randn(S.B, S.T, S.HIDDEN), inner=inner)
    causal_site(S.only(sites))


def test_nanogpt_block_gradients():
    torch.manual_seed(0)
    block = S.NanoGPTBlock().train()          # dropout 0: the training graph, deterministic
    sites = S.check_training(block, S.randn(S.B, S.T, S.HIDDEN, requires_grad=True))
    causal_site(S.only(sites))


def test_nanogpt_dynamic_lengths_one_graph():
    """dynamic=True: the slice `bias[:, :, :T, :T]` has a symbolic T; the buffer is causal for every T it allows."""
    torch.manual_seed(0)
    model = S.NanoGPTAttention().eval()
    from attnlower.compiler import backend

    compiled, sites = S.check_forward(model, S.randn(S.B, 17, S.HIDDEN), dynamic=True)
    graphs = len(backend.reports())
    for t in (37, 50):
        x = S.randn(S.B, t, S.HIDDEN, seed=t)
        S.assert_matches_eager(compiled(x), model(x), what=f"T={t}")
    assert len(backend.reports()) == graphs, "a new length recompiled"
    causal_site(S.only(sites))


def band(p, window):
    keep = torch.tril(torch.ones(p, p))
    return (keep - torch.tril(keep, -window)).view(1, 1, p, p)


@pytest.mark.parametrize("change", ["band", "all_visible", "all_masked", "one_entry"])
def test_nanogpt_buffer_changed_in_place_after_compiling(change):
    """The compiled callable must follow the buffer: recompile, re-prove, or fall back; never a stale causal
    mask. Dynamo does not guard a buffer's values (nor its identity), so the backend must."""
    torch.manual_seed(0)
    model = S.NanoGPTAttention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    with torch.no_grad():
        if change == "band":
            model.bias.copy_(band(model.bias.shape[-1], 5))
        elif change == "all_visible":
            model.bias.fill_(1.0)
        elif change == "all_masked":
            model.bias.zero_()            # every row masked: eager gives NaN everywhere
        else:
            model.bias[0, 0, 20, 3] = 0.0  # one key hidden from one query
    S.assert_matches_eager(compiled(x), model(x), what=f"after the buffer changed ({change})")
    causal_site(S.only(sites))      # checked last, so that the guard above runs even before issue 22 lands


def test_nanogpt_buffer_reassigned_after_compiling():
    torch.manual_seed(0)
    model = S.NanoGPTAttention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    model.bias = band(model.bias.shape[-1], 7)       # a new tensor object, same shape: no Dynamo recompile
    S.assert_matches_eager(compiled(x), model(x), what="after the buffer was reassigned")
    causal_site(S.only(sites))


# ---- transformers GPT-2 (4.2x): bool buffer, bottom-right slice, finfo.min fill -------------------

@pytest.mark.parametrize("past", [0, 32], ids=["no_cache", "cache"])
def test_gpt2_legacy_bool_buffer(past):
    torch.manual_seed(0)
    model = S.GPT2LegacyAttention().eval()
    if past:
        args = (S.randn(S.B, 5, S.HIDDEN), S.randn(S.B, S.H, past, S.D, seed=1), S.randn(S.B, S.H, past, S.D, seed=2))
    else:
        args = (S.randn(S.B, S.T, S.HIDDEN),)
    _, sites = S.check_forward(model, *args)
    causal_site(S.only(sites), bottom_right=bool(past))   # Tq=5, Tk=37: the last query sees every key


# ---- transformers GPT-Neo: causal (global) and band (local) buffers --------------------------------

def test_gpt_neo_global_buffer_is_causal():
    torch.manual_seed(0)
    _, sites = S.check_forward(S.GPTNeoSelfAttention(local=False).eval(), S.randn(S.B, S.T, S.HIDDEN))
    causal_site(S.only(sites))


def test_gpt_neo_local_buffer_is_a_band():
    torch.manual_seed(0)
    _, sites = S.check_forward(S.GPTNeoSelfAttention(local=True).eval(), S.randn(S.B, S.T, S.HIDDEN))
    site = S.only(sites)
    S.assert_site(site, SLIDING, mask="band", causal=True, window=S.WINDOW, bias_kind="none")
    assert re.search(FROM_BUFFER, site.reason), S.describe([site])


def test_gpt_neo_band_widened_after_compiling():
    torch.manual_seed(0)
    model = S.GPTNeoSelfAttention(local=True).eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    p = model.bias.shape[-1]
    with torch.no_grad():
        causal = torch.tril(torch.ones(p, p, dtype=torch.bool))
        model.bias.copy_(torch.bitwise_xor(causal, torch.tril(causal, -16)).view(1, 1, p, p))
    S.assert_matches_eager(compiled(x), model(x), what="after the band was widened to 16")
    S.assert_site(S.only(sites), SLIDING, causal=True, window=S.WINDOW)


def test_hf_gpt_neo_model():
    """The real transformers GPT-Neo: HF's own causal mask (additive finfo.min, proven causal from shapes)
    joins the buffer's mask; their conjunction is the buffer's structure: layer 0 causal, layer 1 a band."""
    model = S.gpt_neo_model()
    ids = torch.randint(0, 128, (S.B, S.T), generator=torch.Generator().manual_seed(0))
    _, sites = S.check_forward(lambda ids: model(input_ids=ids, use_cache=False).last_hidden_state, ids)
    assert len(sites) == 2, S.describe(sites)
    S.assert_site(sites[0], FLASH, causal=True, bias_kind="none")
    S.assert_site(sites[1], SLIDING, causal=True, window=S.WINDOW, bias_kind="none")


# ---- ALiBi kept in a buffer (x-transformers) --------------------------------------------------------

def test_xtransformers_alibi_buffer_becomes_slopes():
    """`bias[h, i, j] = -|j - i| * slope[h]` proven from the buffer; with the causal fill every visible key
    has j <= i, where that is the op's ALiBi `slope * (j - i)`: alibi_slopes + causal, no dense bias."""
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    _, sites = S.check_forward(S.XTransformersAlibi().eval(), q, k, v)
    site = S.only(sites)
    S.assert_site(site, FLASH, causal=True, bias_kind="none", alibi=True)
    assert re.search(FROM_BUFFER, site.reason), S.describe([site])


def test_xtransformers_alibi_buffer_rescaled_after_compiling():
    model = S.XTransformersAlibi().eval()
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    compiled, sites = S.check_forward(model, q, k, v)
    with torch.no_grad():
        model.bias.mul_(3.0)          # still ALiBi, other slopes: a stale slope table would be wrong
    S.assert_matches_eager(compiled(q, k, v), model(q, k, v), what="after the ALiBi buffer was rescaled")
    S.assert_site(S.only(sites), FLASH, causal=True, bias_kind="none", alibi=True)


# ---- buffers that must stay data --------------------------------------------------------------------

class RandomKeepBuffer(torch.nn.Module):
    """A fixed random keep-mask in a buffer (no causal / band / ALiBi structure): it stays the op's bias."""

    def __init__(self):
        super().__init__()
        keep = torch.rand(1, 1, S.T, S.T, generator=torch.Generator().manual_seed(4)) > 0.3
        self.register_buffer("keep", keep | torch.eye(S.T, dtype=torch.bool))

    def forward(self, q, k, v):
        s = (q @ k.transpose(-1, -2)) * S.D ** -0.5
        return s.masked_fill(~self.keep, float("-inf")).softmax(-1) @ v


def test_unstructured_buffer_stays_a_bias():
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    _, sites = S.check_forward(RandomKeepBuffer().eval(), q, k, v)
    S.assert_site(S.only(sites), FLASH, mask="tensor", causal=False, bias_kind="bool")


class MaskWrittenEachCall(torch.nn.Module):
    """A causal buffer that the forward itself edits before using it (a streaming mask that opens one
    more key per call): its value at compile time says nothing about the next call."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(S.T, S.T, dtype=torch.bool)).view(1, 1, S.T, S.T))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, q, k, v):
        self.bias[0, 0, 0, self.step + 1] = True     # query 0 may now see one key of the future
        self.step += 1
        s = (q @ k.transpose(-1, -2)) * S.D ** -0.5
        return s.masked_fill(~self.bias, float("-inf")).softmax(-1) @ v


def test_buffer_written_by_the_graph_is_not_proven():
    model = MaskWrittenEachCall().eval()
    twin = MaskWrittenEachCall().eval()                # eager runs on its own copy of the state
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    want = twin(q, k, v)
    compiled, got, sites = S.compile_sites(model, q, k, v)
    S.assert_matches_eager(got, want)
    print(f"REPORT {S.describe(sites)}")
    assert not any(s.spec and s.spec.get("causal") for s in sites), S.describe(sites)
    for _ in range(2):
        S.assert_matches_eager(compiled(q, k, v), twin(q, k, v), what="next call")


# ---- writes the host guard does not see: the op's device check (`verified`) --------------------------

DEVICE_CHECK = r"checked on the device each call"


def checked_site(site):
    """The structure is the op's, and the op checks the buffer on the device each call (the report says so)."""
    assert site.spec.get("verified") is True, S.describe([site])
    assert re.search(DEVICE_CHECK, site.reason), S.describe([site])


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_nanogpt_buffer_written_through_data_after_compiling(inner):
    """A write through `.data` (legacy code: `self.bias.data.copy_(...)`) bypasses the version counter, and a
    NumPy alias likewise: the host-side guard (identity, `_version`, data pointer) cannot see it. The op's
    device check reads the slice `bias[:, :, :T, :T]` each call and falls back to it as a dense bias."""
    torch.manual_seed(0)
    model = S.NanoGPTAttention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x, inner=inner)
    causal_site(S.only(sites))
    checked_site(S.only(sites))
    p = model.bias.shape[-1]
    for what, value in (("a band", band(p, 5)), ("every key hidden", torch.zeros(1, 1, p, p)),
                        ("causal again", torch.tril(torch.ones(p, p)).view(1, 1, p, p))):
        model.bias.data.copy_(value)
        S.assert_matches_eager(compiled(x), model(x), what=f"after a write through .data ({what})")


def test_nanogpt_buffer_written_through_a_numpy_alias():
    torch.manual_seed(0)
    model = S.NanoGPTAttention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    model.bias.numpy()[0, 0, 20, 3] = 0.0       # one key hidden from one query, behind torch's back
    S.assert_matches_eager(compiled(x), model(x), what="after a write through a NumPy alias")
    checked_site(S.only(sites))


def test_nanogpt_gradients_after_a_write_through_data():
    """Training after the buffer changed behind the guard: the fallback's backward (the mask as a dense bias)."""
    torch.manual_seed(0)
    block = S.NanoGPTBlock().train()
    x = S.randn(S.B, S.T, S.HIDDEN, requires_grad=True)
    compiled, _, sites = S.compile_sites(block, x)
    checked_site(S.only(sites))
    block.attn.bias.data.copy_(band(block.attn.bias.shape[-1], 5))
    want = block(x)
    want_grads = S.grads_of(block, [x], want)
    got = compiled(x)
    got_grads = S.grads_of(block, [x], got)
    S.assert_matches_eager(got, want, what="after a write through .data")
    S.assert_grads_match(got_grads, want_grads)


def test_the_device_check_holds_at_the_proven_value_and_fails_after_a_write():
    """The flag itself, read off the compiled graph: True while the buffer holds the proven pattern (the
    structured kernels run, no byte of the mask read by them), False once a write changed it, True again after
    it is written back. A check that always failed would be exact too, and silently slow."""
    from attnlower.compiler.backend import attnlower_backend

    graphs = []

    def keep_graph(gm, example_inputs):
        compiled = attnlower_backend(gm, example_inputs, options={"inner": "eager", "strict": True})
        graphs.append((compiled, list(example_inputs)))
        return compiled

    torch._dynamo.reset()
    model = S.NanoGPTAttention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    torch.compile(model, backend=keep_graph)(x)
    (gm, inputs), = graphs
    (flag,) = [n for n in gm.graph.nodes if n.name.startswith("attnlower_verified")]

    def verified() -> bool:
        seen = {}

        class Reader(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n is flag:
                    seen["flag"] = out
                return out

        Reader(gm).run(*inputs)
        return bool(seen["flag"])

    assert verified(), "the check fails at the value the structure was proven from"
    p = model.bias.shape[-1]
    model.bias.data.copy_(band(p, 5))
    assert not verified(), "the check passes on a band"
    model.bias.data[0, 0, 20, 3] = 0.0
    model.bias.data.copy_(torch.tril(torch.ones(p, p)).view(1, 1, p, p))
    assert verified(), "the check fails after the buffer was written back"


def test_gpt_neo_band_widened_through_data():
    """The sliding op's fallback: the band read as a dense bias, every key block visited."""
    torch.manual_seed(0)
    model = S.GPTNeoSelfAttention(local=True).eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    S.assert_site(S.only(sites), SLIDING, causal=True, window=S.WINDOW, bias_kind="none")
    checked_site(S.only(sites))
    p = model.bias.shape[-1]
    causal = torch.tril(torch.ones(p, p, dtype=torch.bool))
    model.bias.data.copy_(torch.bitwise_xor(causal, torch.tril(causal, -16)).view(1, 1, p, p))
    S.assert_matches_eager(compiled(x), model(x), what="after the band was widened through .data")


def test_gpt2_legacy_bool_buffer_emptied_through_data():
    """`where(mask, w, finfo.min)`: the fallback is a float bias (0 / finfo.min), so a row with every key hidden
    averages all keys, as eager does (finfo.min is not -inf)."""
    torch.manual_seed(0)
    model = S.GPT2LegacyAttention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    checked_site(S.only(sites))
    model.bias.data[:, :, 10:20] = False
    S.assert_matches_eager(compiled(x), model(x), what="after rows were emptied through .data")


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_xtransformers_alibi_buffer_rescaled_through_data(inner):
    """ALiBi slopes are checked too: the table `slope[h] * (j - i)` on the visible keys, against the slopes the
    op was given; a rescaled table falls back to the table as a dense bias."""
    model = S.XTransformersAlibi().eval()
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    compiled, sites = S.check_forward(model, q, k, v, inner=inner)
    S.assert_site(S.only(sites), FLASH, causal=True, bias_kind="none", alibi=True)
    checked_site(S.only(sites))
    model.bias.data.mul_(3.0)
    S.assert_matches_eager(compiled(q, k, v), model(q, k, v), what="after the ALiBi table was rescaled through .data")


class BufferAndPadding(torch.nn.Module):
    """nanoGPT's buffer and-ed with a HF-style key-padding mask: the mask goes in as the op's bias (the padding
    is data), and the buffer's causal pattern is not taken from its value: the bias reads it each call."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(S.MAX_POSITIONS, S.MAX_POSITIONS)).view(
            1, 1, S.MAX_POSITIONS, S.MAX_POSITIONS))

    def forward(self, q, k, v, attention_mask):
        t = q.shape[-2]
        keep = (self.bias[:, :, :t, :t] != 0) & attention_mask.bool()[:, None, None, :]
        return (q @ k.transpose(-1, -2) * S.D ** -0.5).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_buffer_beside_padding_stays_the_bias():
    model = BufferAndPadding().eval()
    q, k, v = (S.randn(S.B, S.H, S.T, S.D, seed=i) for i in range(3))
    attention_mask = torch.ones(S.B, S.T, dtype=torch.long)
    attention_mask[0, :5] = 0
    compiled, sites = S.check_forward(model, q, k, v, attention_mask)
    S.assert_site(S.only(sites), FLASH, mask="causal+padding", causal=False, bias_kind="bool")
    model.bias.data.fill_(1.0)
    S.assert_matches_eager(compiled(q, k, v, attention_mask), model(q, k, v, attention_mask),
                           what="after a write through .data")


def test_buffer_written_between_calls_recompiles_once():
    """A mask buffer the model edits between calls (outside the compiled code): the first change fails the
    guard and recompiles; from then on the buffer is read as data (a dense bias, no guard), so later changes
    recompile nothing and every call still equals eager."""
    from attnlower.compiler import backend

    torch.manual_seed(0)
    model = S.NanoGPTAttention().eval()
    x = S.randn(S.B, S.T, S.HIDDEN)
    compiled, sites = S.check_forward(model, x)
    causal_site(S.only(sites))
    start = len(backend.reports())
    for step in range(4):
        with torch.no_grad():
            model.bias[0, 0, 20, 3 + step] = 0.0
        S.assert_matches_eager(compiled(x), model(x), what=f"step {step}")
    recompiled = backend.reports()[start:]
    assert len(recompiled) == 1, f"{len(recompiled)} recompiles for 4 changes"
    (site,) = recompiled[0].sites
    assert site.op == FLASH and not site.spec["causal"] and site.spec["bias_kind"] == "bool", S.describe([site])
