"""Attention spelled as other projects spell it, for the five classes of issue 22.

Each spelling is written in our own words after the project named in its docstring: only the attention
(and the mask / layout code it needs) is kept, with small sizes so a CPU compiles it in seconds. Where
transformers 5.25 still ships the spelling (GPT-Neo's buffer masks, BLOOM's `[B*H, T, D]` reshapes),
the tests build the real model instead.

Helpers shared by `tests/passes/test_spelling_class_*.py`:
- `compile_sites(fn, *args)`: the compiled callable, its first result and every report site;
- `assert_matches_eager`: NaN exactly where eager has NaN, elsewhere within the relative tolerance
  `tests/models.py` uses;
- `assert_grads_match`: gradients of a weighted sum of the outputs, compiled vs eager;
- `describe(sites)`: one line per site (op, mask, spec fields, reason) for failure messages.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import models as M

B, H, D = 2, 4, 16
T = 37                       # odd on purpose: no block size divides it
HIDDEN = H * D
MAX_POSITIONS = 64           # the buffers' size (nanoGPT's block_size, GPT-2's n_positions)
WINDOW = 8                   # GPT-Neo's local window, smaller than T
RTOL = M.RTOL
GRAD_RTOL = 1e-4             # tests/test_spellings.py's tolerance on gradients


# ------------------------------------------------------------------------------------------------
# compiling and comparing

def compile_sites(fn: Callable, *args, inner: str = "eager", dynamic=False, **kwargs):
    """(compiled callable, its result on `args`, the report sites of the graphs this call compiled).

    `strict=True`: a pass that raises fails the test instead of falling back to the unmodified graph.
    The callable stays usable, so a test can call it again after changing a buffer.
    """
    from attnlower.compiler import backend

    torch._dynamo.reset()
    start = len(backend.reports())
    compiled = torch.compile(fn, backend="attnlower", dynamic=dynamic,
                             options={"inner": inner, "strict": True})
    out = compiled(*args, **kwargs)
    reports = backend.reports()[start:]
    errors = [r.error for r in reports if r.error]
    assert not errors, f"passes failed: {errors}"
    return compiled, out, [s for r in reports for s in r.sites]


def tensors(result) -> list[torch.Tensor]:
    return M.compared_tensors(result)


def assert_matches_eager(got, want, rtol: float = RTOL[torch.float32], what: str = "output"):
    """Equal to eager: NaN exactly where eager has NaN, elsewhere max |got - want| / max |want| < rtol."""
    got, want = tensors(got), tensors(want)
    assert len(got) == len(want), f"{what}: {len(got)} tensors compiled, {len(want)} eager"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, g.dtype, w.shape, w.dtype)
        nan = torch.isnan(w)
        assert torch.equal(torch.isnan(g), nan), f"{what}[{i}]: NaN pattern differs from eager"
        if (~nan).any():
            gd, wd = g.detach()[~nan].double(), w.detach()[~nan].double()
            err = ((gd - wd).abs().max() / wd.abs().max().clamp_min(1e-30)).item()
            assert err < rtol, f"{what}[{i}]: max relative error {err:.3g} >= {rtol:g}"


def grads_of(module: nn.Module | None, inputs: list[torch.Tensor], out, seed: int = 3) -> dict:
    """Gradients of sum(out * w) (w fixed random) w.r.t. `inputs` and the module's parameters; cleared after."""
    outs = tensors(out)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    found = {f"input{i}": x.grad.clone() for i, x in enumerate(inputs) if x.grad is not None}
    for x in inputs:
        x.grad = None
    if module is not None:
        for name, p in module.named_parameters():
            if p.grad is not None:
                found[name] = p.grad.clone()
        module.zero_grad(set_to_none=True)
    return found


# A gradient that is zero in exact arithmetic (the bias of the key projection: a vector added to every
# key shifts each row of scores by a constant, which softmax cancels) is fp32 round-off in eager and in the
# compiled graph alike (~1e-7 against gradients of ~10): relative to itself two noises never agree. Each
# gradient's error is therefore measured against at least this share of the largest gradient compared.
GRAD_FLOOR = 1e-3


def assert_grads_match(got: dict, want: dict, rtol: float = GRAD_RTOL):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    largest = max((float(w[~torch.isnan(w)].abs().max()) for w in want.values() if (~torch.isnan(w)).any()),
                  default=0.0)
    for name, w in want.items():
        assert torch.equal(torch.isnan(got[name]), torch.isnan(w)), f"grad of {name}: NaN pattern differs"
        ok = ~torch.isnan(w)
        scale = max(float(w[ok].abs().max()), GRAD_FLOOR * largest, 1e-30)
        err = float((got[name][ok] - w[ok]).abs().max()) / scale
        assert err < rtol, f"grad of {name}: max relative error {err:.3g} >= {rtol:g}"


def check_forward(fn, *args, inner: str = "eager", rtol: float = RTOL[torch.float32], dynamic=False):
    """`fn(*args)` compiled equals eager; returns (the compiled callable, the report sites)."""
    want = fn(*args)
    compiled, got, sites = compile_sites(fn, *args, inner=inner, dynamic=dynamic)
    assert_matches_eager(got, want, rtol)
    print(f"REPORT {describe(sites)}")
    return compiled, sites


def check_training(module: nn.Module, *args, inner: str = "eager", rtol: float = RTOL[torch.float32],
                   grad_rtol: float = GRAD_RTOL):
    """`module(*args)` compiled: the output and the gradients of every parameter and of every argument
    that requires grad equal eager's; returns the report sites."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    want = module(*args)
    want_grads = grads_of(module, leaves, want)
    _, got, sites = compile_sites(module, *args, inner=inner)
    got_grads = grads_of(module, leaves, got)
    assert_matches_eager(got, want, rtol)
    assert_grads_match(got_grads, want_grads, grad_rtol)
    print(f"REPORT {describe(sites)}")
    return sites


def assert_site(site, op: str, mask: str | None = None, **spec):
    """The site became `op`, its mask classification is `mask` (when given), and each `spec` field
    equals the given value (a callable is a predicate on the field; a missing field reads as None)."""
    assert site.op == op, f"expected {op}, got:\n{describe([site])}"
    if mask is not None:
        assert site.mask == mask, f"expected mask {mask!r}, got:\n{describe([site])}"
    for key, want in spec.items():
        got = (site.spec or {}).get(key)
        ok = want(got) if callable(want) else got == want
        assert ok, f"spec[{key!r}] = {got!r}, expected {getattr(want, '__name__', want)!r}:\n{describe([site])}"


def only(sites):
    """The one site of a compile."""
    assert len(sites) == 1, describe(sites)
    return sites[0]


def describe(sites) -> str:
    """The report line of each site: op, mask, the spec's structural fields, the reason."""
    keys = ("causal", "bottom_right", "window", "mask_kind", "bias_kind", "fill", "alibi", "paged_block_size")
    lines = []
    for s in sites:
        spec = {k: s.spec[k] for k in keys if s.spec and k in s.spec}
        lines.append(f"op={s.op} mask={s.mask} spec={spec} reason={s.reason}")
    return "\n".join(lines) or "(no sites)"


FnModule = M.Fn      # a plain function as a module (for check_training)


def randn(*shape, seed: int = 0, dtype=torch.float32, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.requires_grad_(requires_grad)


# ================================================================================================
# Class 1: masks stored in module buffers
# ================================================================================================

NanoGPTAttention = M.CausalSelfAttention     # nanoGPT / minGPT: tril buffer, `bias[:, :, :T, :T] == 0`
NanoGPTBlock = M.Block


class GPT2LegacyAttention(nn.Module):
    """transformers 4.2x `GPT2Attention._attn` (also GPT-J / CodeGen of that era).

    A bool `tril` buffer `[1, 1, P, P]`, sliced bottom-right for a cache (`bias[:, :, Tk - Tq : Tk, :Tk]`),
    `where(causal_mask, w, full([], finfo.min))`, scale `w / full([], sqrt(D))`, the past K/V concatenated.
    """

    def __init__(self, n_embd: int = HIDDEN, n_head: int = H, max_positions: int = MAX_POSITIONS):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        causal = torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool))
        self.register_buffer("bias", causal.view(1, 1, max_positions, max_positions), persistent=False)

    def _split_heads(self, x):
        return x.view(*x.shape[:-1], self.n_head, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, hidden, past_key=None, past_value=None):
        query, key, value = self.c_attn(hidden).split(self.n_head * self.head_dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        if past_key is not None:
            key, value = torch.cat((past_key, key), dim=-2), torch.cat((past_value, value), dim=-2)
        w = torch.matmul(query, key.transpose(-1, -2))
        w = w / torch.full([], value.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        q_len, k_len = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, k_len - q_len: k_len, :k_len]
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal_mask, w.to(w.dtype), mask_value)
        w = nn.functional.softmax(w, dim=-1).type(value.dtype)
        out = torch.matmul(w, value)
        out = out.permute(0, 2, 1, 3).contiguous().view(hidden.shape[0], q_len, -1)
        return self.c_proj(out)


class GPT2V4Attention(nn.Module):
    """transformers 4.0 `Attention._attn` (GPT-2): a uint8 `tril` buffer and a `masked_bias` buffer
    holding -1e4, `where(mask.bool(), w, masked_bias.to(w.dtype))`; k split as `[B, H, D, T]`."""

    def __init__(self, n_embd: int = HIDDEN, n_head: int = H, n_ctx: int = MAX_POSITIONS):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("bias", torch.tril(torch.ones((n_ctx, n_ctx), dtype=torch.uint8)).view(1, 1, n_ctx, n_ctx))
        self.register_buffer("masked_bias", torch.tensor(-1e4))

    def split_heads(self, x, k=False):
        x = x.view(*x.shape[:-1], self.n_head, x.size(-1) // self.n_head)
        return x.permute(0, 2, 3, 1) if k else x.permute(0, 2, 1, 3)

    def forward(self, x):
        query, key, value = self.c_attn(x).split(x.size(-1), dim=2)
        q, k, v = self.split_heads(query), self.split_heads(key, k=True), self.split_heads(value)
        w = torch.matmul(q, k)
        w = w / (float(v.size(-1)) ** 0.5)
        nd, ns = w.size(-2), w.size(-1)
        mask = self.bias[:, :, ns - nd: ns, :ns]
        w = torch.where(mask.bool(), w, self.masked_bias.to(w.dtype))
        w = nn.Softmax(dim=-1)(w)
        a = torch.matmul(w, v)
        a = a.permute(0, 2, 1, 3).contiguous()
        return self.c_proj(a.view(*a.shape[:-2], a.size(-2) * a.size(-1)))


def gpt_neo_model(seed: int = 0):
    """The real transformers GPT-Neo (eager): layer 0 "global" (a `tril` buffer), layer 1 "local"
    (`bitwise_xor(bias, tril(bias, -window))`: a band buffer), `where(causal_mask, w, tensor(finfo.min))`,
    no 1/sqrt(D) scale, scores in fp32."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPTNeoConfig(
        vocab_size=128, max_position_embeddings=MAX_POSITIONS, hidden_size=HIDDEN, num_layers=2, num_heads=H,
        attention_types=[[["global", "local"], 1]], window_size=WINDOW, attention_dropout=0.0,
        resid_dropout=0.0, embed_dropout=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.GPTNeoModel(cfg).eval()


class GPTNeoSelfAttention(nn.Module):
    """transformers GPT-Neo's `_attn` on its own (no HF attention mask on top): a band (local) or
    causal (global) bool buffer, sliced `[Tk - Tq : Tk, :Tk]`, `where(..., tensor(finfo.min))`."""

    def __init__(self, local: bool, n_embd: int = HIDDEN, n_head: int = H, max_positions: int = MAX_POSITIONS,
                 window_size: int = WINDOW):
        super().__init__()
        self.n_head, self.head_dim = n_head, n_embd // n_head
        p = max_positions
        bias = torch.tril(torch.ones((p, p), dtype=bool)).view(1, 1, p, p)
        if local:
            bias = torch.bitwise_xor(bias, torch.tril(bias, -window_size))
        self.register_buffer("bias", bias, persistent=False)
        self.q_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.out_proj = nn.Linear(n_embd, n_embd)

    def _split_heads(self, x):
        return x.view(*x.shape[:-1], self.n_head, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, hidden):
        query = self._split_heads(self.q_proj(hidden)).to(torch.float32)
        key = self._split_heads(self.k_proj(hidden)).to(torch.float32)
        value = self._split_heads(self.v_proj(hidden))
        w = torch.matmul(query, key.transpose(-1, -2))
        q_len, k_len = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, k_len - q_len: k_len, :k_len]
        mask_value = torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal_mask, w, mask_value)
        w = nn.functional.softmax(w, dim=-1).to(value.dtype)
        out = torch.matmul(w, value).permute(0, 2, 1, 3).contiguous()
        return self.out_proj(out.view(*out.shape[:-2], -1))


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's geometric slopes (Press et al.), power-of-two head counts."""
    start = 2 ** (-(2 ** -(math.log2(heads) - 3)))
    return [start * start ** i for i in range(heads)]


class XTransformersAlibi(nn.Module):
    """x-transformers `AlibiPositionalBias` after its first call: `slopes [H, 1, 1]` and the cached
    `bias [H, P, P] = -|j - i| * slope` are buffers; `Attention` adds `bias[..., -i:, -j:]` to the
    einsum scores and masks the future with `triu(j - i + 1)` filled with `-finfo.max`."""

    def __init__(self, heads: int = H, max_len: int = MAX_POSITIONS):
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(heads)).view(heads, 1, 1), persistent=False)
        pos = torch.arange(max_len)
        distance = -(pos[None, None, :] - pos[None, :, None]).abs()
        self.register_buffer("bias", distance * self.slopes, persistent=False)
        self.scale = D ** -0.5

    def forward(self, q, k, v):
        i, j = q.shape[-2], k.shape[-2]
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        sim = sim + self.bias[..., -i:, -j:]
        causal_mask = torch.ones((i, j), device=q.device, dtype=torch.bool).triu(j - i + 1)
        sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


# ================================================================================================
# Class 2: finite fills
# ================================================================================================

def subsequent_mask(size: int, device=None) -> torch.Tensor:
    """The Annotated Transformer's `subsequent_mask`: True where a position may be attended."""
    attn_shape = (1, size, size)
    return torch.triu(torch.ones(attn_shape, device=device), diagonal=1).type(torch.uint8) == 0


def annotated_attention(query, key, value, mask=None):
    """The Annotated Transformer's `attention`: `masked_fill(mask == 0, -1e9)`, returning the probabilities."""
    d_k = query.size(-1)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(d_k)
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    p_attn = scores.softmax(dim=-1)
    return torch.matmul(p_attn, value), p_attn


class AnnotatedMultiHeadedAttention(nn.Module):
    """The Annotated Transformer's `MultiHeadedAttention`. With `keep_attn` it stores the probabilities
    on the module (`self.attn = p_attn`), as the original does: they then leave the graph."""

    def __init__(self, h: int = H, d_model: int = HIDDEN, keep_attn: bool = False):
        super().__init__()
        self.d_k, self.h, self.keep_attn = d_model // h, h, keep_attn
        self.linears = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(4))
        self.attn = None

    def forward(self, query, key, value, mask=None):
        if mask is not None:
            mask = mask.unsqueeze(1)      # the same mask for every head
        nbatches = query.size(0)
        query, key, value = [lin(x).view(nbatches, -1, self.h, self.d_k).transpose(1, 2)
                             for lin, x in zip(self.linears, (query, key, value))]
        x, attn = annotated_attention(query, key, value, mask=mask)
        if self.keep_attn:
            self.attn = attn
        x = x.transpose(1, 2).contiguous().view(nbatches, -1, self.h * self.d_k)
        return self.linears[-1](x)


class AnnotatedDecoderSelfAttention(nn.Module):
    """The Annotated Transformer's decoder self-attention with `Batch.make_std_mask` inside the compiled
    code: `(tgt != pad).unsqueeze(-2) & subsequent_mask(T)`."""

    def __init__(self, vocab: int = 32, pad: int = 0, keep_attn: bool = False):
        super().__init__()
        self.pad = pad
        self.embed = nn.Embedding(vocab, HIDDEN)
        self.self_attn = AnnotatedMultiHeadedAttention(keep_attn=keep_attn)

    def forward(self, tgt):
        tgt_mask = (tgt != self.pad).unsqueeze(-2)
        tgt_mask = tgt_mask & subsequent_mask(tgt.size(-1), tgt.device).type_as(tgt_mask)
        x = self.embed(tgt)
        return self.self_attn(x, x, x, tgt_mask)


class AnnotatedEncoderSelfAttention(nn.Module):
    """The Annotated Transformer's encoder self-attention: `src_mask = (src != pad).unsqueeze(-2)`."""

    def __init__(self, vocab: int = 32, pad: int = 0):
        super().__init__()
        self.pad = pad
        self.embed = nn.Embedding(vocab, HIDDEN)
        self.self_attn = AnnotatedMultiHeadedAttention()

    def forward(self, src):
        src_mask = (src != self.pad).unsqueeze(-2)
        x = self.embed(src)
        return self.self_attn(x, x, x, src_mask)


def padded_tokens(t: int = T, vocab: int = 32, pad: int = 0, left_pad: int = 5, empty_row: int | None = None,
                  seed: int = 0):
    """[B, t] token ids in 1..vocab-1; row 0 left-padded with `left_pad` pad tokens; row `empty_row`
    entirely padding (every key of that sequence masked)."""
    tokens = torch.randint(1, vocab, (B, t), generator=torch.Generator().manual_seed(seed))
    tokens[0, :left_pad] = pad
    if empty_row is not None:
        tokens[empty_row] = pad
    return tokens


class BertEraSelfAttention(nn.Module):
    """transformers <= 4.2x BERT: `get_extended_attention_mask` makes `(1.0 - mask[:, None, None, :]) * -10000.0`,
    added to `matmul(q, kᵀ) / sqrt(D)`; `transpose_for_scores` = view + permute(0, 2, 1, 3)."""

    def __init__(self, fill: float = -10000.0):
        super().__init__()
        self.fill = fill
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def transpose_for_scores(self, x):
        return x.view(x.size()[:-1] + (H, D)).permute(0, 2, 1, 3)

    def forward(self, hidden, attention_mask):
        extended = attention_mask[:, None, None, :].to(dtype=hidden.dtype)
        extended = (1.0 - extended) * self.fill
        q = self.transpose_for_scores(self.query(hidden))
        k = self.transpose_for_scores(self.key(hidden))
        v = self.transpose_for_scores(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores + extended
        probs = nn.functional.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (HIDDEN,))


class DistilBertSelfAttention(nn.Module):
    """transformers 4.x DistilBERT `MultiHeadSelfAttention`: `mask = (mask == 0).view(bs, 1, 1, k_len)
    .expand_as(scores)`, `scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))`."""

    def __init__(self):
        super().__init__()
        self.q_lin, self.k_lin, self.v_lin = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, hidden, mask):
        bs, q_length, dim = hidden.size()
        k_length = hidden.size(1)
        mask_reshp = (bs, 1, 1, k_length)

        def shape(x):
            return x.view(bs, -1, H, D).transpose(1, 2)

        q = shape(self.q_lin(hidden)) / math.sqrt(D)
        k, v = shape(self.k_lin(hidden)), shape(self.v_lin(hidden))
        scores = torch.matmul(q, k.transpose(2, 3))
        mask = (mask == 0).view(mask_reshp).expand_as(scores)
        scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
        weights = nn.functional.softmax(scores, dim=-1)
        ctx = torch.matmul(weights, v)
        return ctx.transpose(1, 2).contiguous().view(bs, -1, H * D)


def padding_mask(t: int = T, left_pad: int = 5, empty_row: int | None = None) -> torch.Tensor:
    """[B, t] long attention_mask (1 = token): row 0 left-padded, row `empty_row` all padding."""
    mask = torch.ones(B, t, dtype=torch.long)
    mask[0, :left_pad] = 0
    if empty_row is not None:
        mask[empty_row] = 0
    return mask


# ================================================================================================
# Class 3: masks and biases added through a re-batched view of the scores
# ================================================================================================

WIN = 4                      # window side: N = 16 tokens per window
N_TOK = WIN * WIN
GRID = 2                     # 2 x 2 windows per image: nW = 4
N_WIN = GRID * GRID
SWIN_HEADS = 2
SWIN_DIM = SWIN_HEADS * D


def relative_position_index(win: int = WIN) -> torch.Tensor:
    """Swin's `relative_position_index` buffer: [N, N] indices into the `(2W-1)^2` bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += win - 1
    rel[:, :, 1] += win - 1
    rel[:, :, 0] *= 2 * win - 1
    return rel.sum(-1)


def shifted_window_mask(grid: int = GRID, win: int = WIN, shift: int = WIN // 2) -> torch.Tensor:
    """Swin's SW-MSA mask `[nW, N, N]`: 0 within a region, -100.0 across regions (a finite bias)."""
    size = grid * win
    img_mask = torch.zeros((1, size, size, 1))
    cnt = 0
    for hs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
        for ws in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
            img_mask[:, hs, ws, :] = cnt
            cnt += 1
    windows = img_mask.view(1, grid, win, grid, win, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win)
    attn_mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


class TimmWindowAttention(nn.Module):
    """timm `swin_transformer.WindowAttention` (the `fused_attn=False` path): `q * scale`, relative
    position bias `table[index.view(-1)]`, then `attn.view(-1, nW, H, N, N) + mask.unsqueeze(1)
    .unsqueeze(0)` and `view(-1, H, N, N)` back. The SW-MSA mask is the block's buffer, as in timm."""

    def __init__(self, dim: int = SWIN_DIM, num_heads: int = SWIN_HEADS, win: int = WIN):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * win - 1) ** 2, num_heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(win), persistent=False)
        self.register_buffer("attn_mask", shifted_window_mask(), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def _get_rel_pos_bias(self):
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        mask = self.attn_mask
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)


class HFSwinSelfAttention(nn.Module):
    """transformers 4.x `SwinSelfAttention`: `transpose_for_scores`, `/ sqrt(head_size)`, relative position
    bias, then `scores.view(batch // mask_shape, mask_shape, H, dim, dim) + attention_mask.unsqueeze(1)
    .unsqueeze(0)` and `view(-1, H, dim, dim)`; the mask comes in as an argument (SwinLayer makes it)."""

    def __init__(self, dim: int = SWIN_DIM, num_heads: int = SWIN_HEADS, win: int = WIN):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = num_heads, dim // num_heads
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * win - 1) ** 2, num_heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(win), persistent=False)
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.window = win

    def transpose_for_scores(self, x):
        return x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        batch_size, dim, num_channels = hidden_states.shape
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        scores = scores + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        mask_shape = attention_mask.shape[0]
        scores = scores.view(batch_size // mask_shape, mask_shape, self.num_attention_heads, dim, dim)
        scores = scores + attention_mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, self.num_attention_heads, dim, dim)
        probs = nn.functional.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (num_channels,))


class TimmWindowAttentionV2(nn.Module):
    """timm `swin_transformer_v2.WindowAttention`: cosine attention `normalize(q) @ normalize(k)ᵀ` times
    `clamp(logit_scale, max=log(100)).exp()`, a `16 * sigmoid(...)` relative bias, and the same
    `view(-1, nW, H, N, N) + mask` re-batched mask."""

    def __init__(self, dim: int = SWIN_DIM, num_heads: int = SWIN_HEADS, win: int = WIN):
        super().__init__()
        self.num_heads = num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * win - 1) ** 2, num_heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(win), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.win = win

    def forward(self, x, mask):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous()).unsqueeze(0)
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)


def windows(seed: int = 0, requires_grad: bool = False):
    """Window tokens `[B * nW, N, C]` (what `window_partition` hands the attention)."""
    return randn(B * N_WIN, N_TOK, SWIN_DIM, seed=seed, requires_grad=requires_grad)


# ================================================================================================
# Class 4: transposed probabilities, extra batch dims, flattening reshapes
# ================================================================================================

class TamingAttnBlock(nn.Module):
    """taming-transformers / latent-diffusion `AttnBlock` (Stable Diffusion's VAE): single head over
    the pixels, `w_ = bmm(q, k)` with q `[b, hw, c]`, `softmax(dim=2)`, then `bmm(v, w_.permute(0, 2, 1))`
    giving `[b, c, hw]`: the probabilities transposed before the product with V."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)      # b, hw, c
        k = k.reshape(b, c, h * w)                        # b, c, hw
        w_ = torch.bmm(q, k)                              # b, hw, hw
        w_ = w_ * (int(c) ** (-0.5))
        w_ = torch.nn.functional.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        w_ = w_.permute(0, 2, 1)                          # b, hw (keys), hw (queries)
        h_ = torch.bmm(v, w_)                             # b, c, hw (queries)
        h_ = h_.reshape(b, c, h, w)
        return x + self.proj_out(h_)


class BigGANAttention(nn.Module):
    """BigGAN-PyTorch `layers.Attention` (SAGAN): theta/phi at C/8, phi and g max-pooled (Tk = HW/4),
    g at C/2, `softmax(bmm(theta.transpose(1, 2), phi), -1)`, then `bmm(g, beta.transpose(1, 2))`:
    transposed probabilities, no 1/sqrt(D) scale, a value head dim (C/2) unlike the query's (C/8)."""

    def __init__(self, ch: int = 64):
        super().__init__()
        self.ch = ch
        self.theta = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.phi = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.g = nn.Conv2d(ch, ch // 2, 1, bias=False)
        self.o = nn.Conv2d(ch // 2, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        theta = self.theta(x)
        phi = F.max_pool2d(self.phi(x), [2, 2])
        g = F.max_pool2d(self.g(x), [2, 2])
        theta = theta.view(-1, self.ch // 8, x.shape[2] * x.shape[3])
        phi = phi.view(-1, self.ch // 8, x.shape[2] * x.shape[3] // 4)
        g = g.view(-1, self.ch // 2, x.shape[2] * x.shape[3] // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x


N_BLOCKS, BLOCK = 4, 9       # block-local attention: T = 36 split into 4 blocks of 9


def block_local_matmul(q, k, v):
    """Block-local attention with the blocks kept as a batch dim: `[B, H, nBlocks, Tb, D]` operands,
    scores `[B, H, nBlocks, Tb, Tb]` (the layout of blockwise / local attention before the blocks are
    merged into the batch)."""
    b, h, t, d = q.shape
    qb, kb, vb = (x.view(b, h, N_BLOCKS, t // N_BLOCKS, d) for x in (q, k, v))
    s = (qb @ kb.transpose(-1, -2)) * d ** -0.5
    out = s.softmax(dim=-1) @ vb
    return out.reshape(b, h, t, d)


def block_local_einsum(q, k, v):
    """The same block-local attention through einsum (`b h n i d, b h n j d -> b h n i j`)."""
    b, h, t, d = q.shape
    qb, kb, vb = (x.reshape(b, h, N_BLOCKS, t // N_BLOCKS, d) for x in (q, k, v))
    s = torch.einsum("bhnid,bhnjd->bhnij", qb, kb) * d ** -0.5
    out = torch.einsum("bhnij,bhnjd->bhnid", s.softmax(dim=-1), vb)
    return out.reshape(b, h, t, d)


def block_local_qkv(seed: int = 0, requires_grad: bool = False):
    return tuple(randn(B, H, N_BLOCKS * BLOCK, D, seed=seed + i, requires_grad=requires_grad) for i in range(3))


class FairseqMultiheadAttention(nn.Module):
    """fairseq `MultiheadAttention` (the non-fused path): sequence-first `[T, B, E]`, heads split by
    `q.contiguous().view(T, B * H, D).transpose(0, 1)` (`[B*H, T, D]`), `bmm`, the key padding mask
    applied in a `[B, H, T, S]` view and viewed back, `bmm` with V, `transpose(0, 1)` back."""

    def __init__(self, embed_dim: int = HIDDEN, num_heads: int = H):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(4))

    def forward(self, query, key_padding_mask):
        tgt_len, bsz, embed_dim = query.size()
        q = self.q_proj(query) * self.scaling
        k, v = self.k_proj(query), self.v_proj(query)
        q = q.contiguous().view(tgt_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        src_len = k.size(1)
        attn_weights = torch.bmm(q, k.transpose(1, 2))
        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
        attn_weights = attn_weights.masked_fill(key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool),
                                                float("-inf"))
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).type_as(attn_weights)
        attn = torch.bmm(attn_probs, v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return self.out_proj(attn)


def bloom_model(seed: int = 0):
    """The real transformers BLOOM (eager): fused qkv viewed `[B, T, H, 3, D]`, each of q/k/v sliced and
    transposed, then `reshape(B * H, T, D)` (a copy: the slice is not contiguous), ALiBi through
    `alibi.baddbmm(q, kᵀ)`, the mask added in a `[B, H, Tq, Tk]` view, `bmm` with V."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=HIDDEN, n_layer=2, n_head=H,
                                   attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.BloomModel(cfg).eval()


def interleaved_heads(x, w_qkv):
    """Heads split with the head index fastest (`(d h)` in einops terms): `[B, T, D, H]`, then
    `permute(0, 3, 1, 2).reshape(B * H, T, D)` (a copy), `bmm` attention, the output folded back."""
    b, t, _ = x.shape
    q, k, v = ((x @ w).view(b, t, D, H).permute(0, 3, 1, 2).reshape(b * H, t, D) for w in w_qkv.unbind(0))
    s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D)
    out = torch.bmm(torch.softmax(s, dim=-1), v)
    return out.view(b, H, t, D).permute(0, 2, 3, 1).reshape(b, t, D * H)


def slot_attention_step(inputs, slots, w_q, w_k, w_v, eps: float = 1e-8):
    """Slot Attention (Locatello et al.; lucidrains/slot-attention): the softmax runs over the *slots*
    (`dots.softmax(dim=1)`), then each slot's weights are renormalized over the inputs. It is not
    attention of the slots over the inputs and must stay unfused."""
    q = slots @ w_q
    k, v = inputs @ w_k, inputs @ w_v
    dots = torch.einsum("bid,bjd->bij", q, k) * q.shape[-1] ** -0.5
    attn = dots.softmax(dim=1) + eps
    attn = attn / attn.sum(dim=-1, keepdim=True)
    return torch.einsum("bjd,bij->bid", v, attn)


# ================================================================================================
# Class 5: paged gathers
# ================================================================================================

NUM_BLOCKS, BLOCK_SIZE, MAX_BLOCKS, HKV = 24, 8, 5, 2     # 5 blocks of 8: up to 40 tokens per sequence
PAGED_LENS = (29, 37)                                     # the lengths (odd, not block multiples)


def block_table(seed: int = 0) -> torch.Tensor:
    """[B, MAX_BLOCKS] int32 block ids, distinct, in random order (sequences' blocks are scattered)."""
    ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))[: B * MAX_BLOCKS]
    return ids.view(B, MAX_BLOCKS).to(torch.int32)


def vllm_kv_cache(seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """vLLM v1's FlashAttention-backend cache for one layer: `[2, num_blocks, block_size, Hkv, D]` (NHD)."""
    return randn(2, NUM_BLOCKS, BLOCK_SIZE, HKV, D, seed=seed, dtype=dtype)


def flashinfer_kv_cache(seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """FlashInfer's paged KV cache in the HND layout: `[num_pages, 2, Hkv, page_size, D]`."""
    return randn(NUM_BLOCKS, 2, HKV, BLOCK_SIZE, D, seed=seed, dtype=dtype)


def vllm_decode(q, kv_cache, block_tables, seq_lens):
    """vLLM's paged reference, batched: `key_cache, value_cache = kv_cache.unbind(0)`, advanced indexing
    `key_cache[block_tables]` viewed `[B, L, Hkv, D]` (as `ref_paged_attn`'s `.view(-1, Hkv, D)`), SDPA
    over the gathered keys with a length mask. q is `[B, Hq, 1, D]` (decode)."""
    key_cache, value_cache = kv_cache.unbind(0)
    b = block_tables.shape[0]
    k = key_cache[block_tables].view(b, -1, HKV, D).transpose(1, 2)
    v = value_cache[block_tables].view(b, -1, HKV, D).transpose(1, 2)
    keep = torch.arange(k.shape[2], device=q.device)[None, None, None, :] < seq_lens[:, None, None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def vllm_chunked_prefill(q, kv_cache, block_tables, seq_lens):
    """vLLM's `ref_paged_attn` mask for a chunk of Tq > 1 new tokens at the end of each sequence:
    causal within the chunk, aligned to the cached prefix (`triu(diagonal=kv_len - query_len + 1)` per
    sequence, here batched: key t visible iff t < len and t <= len - Tq + i), matmuls with einsum."""
    key_cache, value_cache = kv_cache.unbind(0)
    b, hq, tq, d = q.shape
    k = key_cache[block_tables].view(b, -1, HKV, D)
    v = value_cache[block_tables].view(b, -1, HKV, D)
    k, v = (x.repeat_interleave(hq // HKV, dim=2) for x in (k, v))
    attn = torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2) * d ** -0.5, k).float()
    pos = torch.arange(k.shape[1], device=q.device)
    query_pos = seq_lens[:, None] - tq + torch.arange(tq, device=q.device)[None, :]       # [B, Tq]
    hidden = (pos[None, None, :] >= seq_lens[:, None, None]) | (pos[None, None, :] > query_pos[:, :, None])
    attn = attn.masked_fill(hidden[:, None], float("-inf"))
    attn = torch.softmax(attn, dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", attn, v).transpose(1, 2)


def flashinfer_decode(q, kv_cache, block_tables, seq_lens):
    """FlashInfer's HND layout read by hand: `kv_cache[:, 0]` / `[:, 1]` are `[pages, Hkv, page, D]`
    pools, gathered with `index_select` on the flattened table, GQA by `repeat_interleave`, matmuls and
    `masked_fill(position >= len, -inf)`."""
    b, hq = q.shape[0], q.shape[1]
    flat = block_tables.flatten().long()

    def gather(pool):
        x = pool.index_select(0, flat).view(b, MAX_BLOCKS, HKV, BLOCK_SIZE, D)
        return x.transpose(1, 2).reshape(b, HKV, MAX_BLOCKS * BLOCK_SIZE, D).repeat_interleave(hq // HKV, dim=1)

    k, v = gather(kv_cache[:, 0]), gather(kv_cache[:, 1])
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.arange(k.shape[2]).view(1, 1, 1, -1) >= seq_lens.view(-1, 1, 1, 1), float("-inf"))
    return s.softmax(-1) @ v


def flashinfer_chunked_prefill(q, kv_cache, block_tables, seq_lens):
    """The HND layout with a chunk of Tq new tokens: SDPA with a bool keep-mask made of the length mask
    and the chunk's causal mask aligned to the end of each sequence (attnlower's examples/paged_decode.py
    builds its prefill mask this way)."""
    b, hq, tq, _ = q.shape

    def gather(pool):
        x = pool[block_tables.long()]                                     # [B, max_blocks, Hkv, page, D]
        return x.permute(0, 2, 1, 3, 4).reshape(b, HKV, MAX_BLOCKS * BLOCK_SIZE, D)

    k, v = gather(kv_cache[:, 0]), gather(kv_cache[:, 1])
    length = k.shape[2]
    keep = torch.arange(length)[None, None, None, :] < seq_lens[:, None, None, None]
    pos = seq_lens[:, None] - tq + torch.arange(tq)[None, :]
    keep = keep & (torch.arange(length)[None, None, None, :] <= pos[:, None, :, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def paged_inputs(tq: int = 1, seed: int = 0, layout: str = "vllm", lens=PAGED_LENS, dtype=torch.float32):
    """(q [B, H, tq, D], kv_cache in `layout`, block_table [B, MAX_BLOCKS] int32, seq_lens [B] int32)."""
    cache = vllm_kv_cache(seed, dtype) if layout == "vllm" else flashinfer_kv_cache(seed, dtype)
    return (randn(B, H, tq, D, seed=seed + 100, dtype=dtype), cache, block_table(seed),
            torch.tensor(lens, dtype=torch.int32))
