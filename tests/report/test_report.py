"""The report in the user's words: `print()` shows the table, reasons name the user's arguments and
attributes (not aten node names), say nothing twice, say why this op and what it saves."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnlower
from attnlower.report import names
from attnlower.report.costs import savings
from attnlower.report.records import CompileReport, Reports, Site
from attnlower.target import Target

# aten / Dynamo node names a reason must not show: placeholders, lifted constants, numbered nodes.
INTERNAL = re.compile(r"\barg\d+_\d+\b|\b_tensor_constant\d+\b|`\w+_\d+`|\bL_\w+_\b|`(index|le|eq|lt|ge)`")


class BufferMask(nn.Module):
    """nanoGPT-style attention whose mask is a registered buffer holding data (not provably causal),
    plus an HF-style additive `attention_mask` argument."""

    def __init__(self, t: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        keep = torch.rand(t, t, generator=g) > 0.3
        keep |= torch.eye(t, dtype=torch.bool)
        self.register_buffer("bias", keep.view(1, 1, t, t))

    def forward(self, q, k, v, attention_mask):
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        att = att.masked_fill(self.bias == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class Wrapper(nn.Module):
    def __init__(self, t: int):
        super().__init__()
        self.attn = BufferMask(t)

    def forward(self, q, k, v, attention_mask):
        return self.attn(q, k, v, attention_mask)


class Causal(nn.Module):
    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
        att = att.masked_fill(torch.tril(torch.ones(t, t, dtype=torch.bool)).logical_not(), float("-inf"))
        return torch.softmax(att, dim=-1) @ v


def _qkv(t=13, d=8):
    torch.manual_seed(0)
    return [torch.randn(2, 3, t, d) for _ in range(3)]


def test_print_shows_the_table_not_the_dataclass():
    reports = attnlower.inspect(Causal(), *_qkv(), options={"inner": "eager"})
    assert isinstance(reports, Reports) and len(reports) == 1
    text = str(reports)
    assert text.startswith("attnlower graph") and "flash_attention" in text and "Site(" not in text
    assert str(reports[0]) == reports[0].table()
    assert repr(reports[0]).startswith("<CompileReport graph") and len(repr(reports[0])) < 120
    assert str(Reports()) == "attnlower: no graph was compiled"


def test_the_table_says_what_each_site_was_checked_on():
    (report,) = attnlower.inspect(Causal(), *_qkv(), options={"inner": "eager"})
    (site,) = report.sites
    assert site.validated.startswith("float64 CPU, 3 input draws"), site.validated
    flat = " ".join(report.table().split())   # the notes wrap at word boundaries
    assert f"validation: passed on {' '.join(site.validated.split())}" in flat, report.table()
    (off,) = attnlower.inspect(Causal(), *_qkv(), options={"inner": "eager", "validate": False})
    assert "validation: not checked: options validate=False" in off.table()


def test_causal_reason_says_each_clause_once():
    (report,) = attnlower.inspect(Causal(), *_qkv(), options={"inner": "eager"})
    (site,) = report.sites
    assert site.op == "flash_attention"
    assert site.reason.count("top-left") == 1, site.reason
    assert "not sliding" in site.choice and "not paged" in site.choice
    assert "not materialized" in site.saves


def test_reasons_name_the_users_argument_and_attribute():
    t = 11
    q, k, v = _qkv(t)
    attention_mask = torch.zeros(2, 1, 1, t)
    (report,) = attnlower.inspect(Wrapper(t), q, k, v, attention_mask, options={"inner": "eager"})
    (site,) = report.sites
    assert site.op == "flash_attention" and site.mask == "tensor", str(report)
    assert "`self.attn.bias`" in site.reason, site.reason
    assert not INTERNAL.search(site.reason), site.reason
    assert not INTERNAL.search(str(report)), str(report)


def test_hf_padding_reason_names_attention_mask():
    pytest.importorskip("transformers")
    import models   # tests/models.py

    case = models.hf_model("llama", "eager", "pad")
    reports = attnlower.inspect(case.model, *case.inputs.args, options={"inner": "eager"}, **case.inputs.kwargs)
    reasons = [s.reason for r in reports for s in r.sites]
    assert reasons and all("`attention_mask`" in r for r in reasons), reasons
    assert not any(INTERNAL.search(r) for r in reasons), reasons


def test_humanize_rewrites_only_node_names():
    def f(arg0_1, arg1_1):
        eq = arg0_1 == 0
        return eq + arg1_1, arg1_1 * 2 * 3   # mul, mul_1

    graph = torch.fx.symbolic_trace(f).graph
    (eq,) = [n for n in graph.nodes if n.op == "call_function" and n.name == "eq"]
    eq.meta["stack_trace"] = '  File "/src/model.py", line 12, in forward\n    keep = mask == 0\n'
    (mul,) = [n for n in graph.nodes if n.name == "mul_1"]
    args = {"arg0_1": "attention_mask", "arg1_1": "self.attn.bias"}
    text = (f"`eq` (eq) reads tensor input `arg0_1`; arg1_1 is added; the softmax (eq) is used by {mul.name}; "
            "mask eq 0")
    out = names.humanize(text, graph, args)
    assert out.startswith("`keep = mask == 0` at model.py:12 reads tensor input `attention_mask`; "
                          "`self.attn.bias` is added"), out
    assert "the softmax (eq) is used by" in out and out.endswith("mask eq 0")   # prose left alone
    assert "mul_1" not in out and "used by `mul` (an op with no source line)" in out


def test_dedupe_the_issue_example():
    text = "causal (top-left), blocks above the diagonal skipped (causal (top-left), at Tq=Tk=48)"
    assert names.dedupe(text) == "causal (top-left), blocks above the diagonal skipped (at Tq=Tk=48)"
    assert names.dedupe("padding mask (every key visible)") == "padding mask (every key visible)"
    assert names.dedupe("causal (top-left), blocks above the diagonal skipped (SDPA is_causal=True (top-left))") \
        == "causal (top-left), blocks above the diagonal skipped (SDPA is_causal=True)"


def test_dedupe_never_cuts_quoted_code():
    # a document mask's reason quotes its source line twice: the second quote kept whole (it read "`doc =.cumsum`")
    code = "`doc = (pos == 0).cumsum(-1)` at model.py:3"
    text = f"key j visible within the query's document: {code}[b, i]; documents {code} [1, 8] passed as doc_ids"
    assert names.dedupe(text) == text
    assert names.dedupe(f"{code} (pos == 0)") == f"{code}"      # a clause outside the quotes still goes


def test_source_names():
    assert names.source_name("L_attention_mask_") == "attention_mask"
    assert names.source_name("L_self_modules_attn_buffers_bias_") == "self.attn.bias"
    assert names.source_name("L_self_modules_layers_modules_0_modules_q_proj_parameters_weight_") == \
        "self.layers.0.q_proj.weight"


def _site(dtype="bfloat16", causal=True, window=0, t=4096, unfused=None):
    b, h, d = 4, 32, 128
    op = "sliding_window_attention" if window else "flash_attention"
    scores = b * h * t * t * {"bfloat16": 2, "float32": 4}[dtype]
    return Site(index=0, location="x.py:1", spelling="matmul-softmax-matmul",
                shapes={n: f"[{b}, {h}, {t}, {d}]" for n in "qkv"}, mask="causal", op=op, reason="",
                spec={"op": op, "dtype": dtype, "causal": causal, "bottom_right": False, "window": window,
                      "bias_kind": "none"},
                memory={"unfused_bytes": unfused if unfused is not None else 3 * scores, "note": ""})


def test_savings_roofline_on_a_known_gpu():
    h100 = Target(kind="cuda", arch=90, sm_count=132, name="NVIDIA H100 80GB HBM3")
    text = savings(_site(), h100)
    m = re.search(r"fused >= ([\d.]+) us, unfused >= ([\d.]+) us", text)
    assert m and "roofline on H100" in text, text
    fused, unfused = float(m.group(1)), float(m.group(2))
    # 4x32x4096x4096, D=128, bf16: 4*B*H*T*T*D = 1.1 TFLOP in full, about half of it causal,
    # at 989 TFLOP/s ~ 0.56 ms; unfused computes all of it and moves 12 GiB of scores twice
    assert 500 < fused < 620 and unfused > 2 * fused, text
    band = float(re.search(r"fused >= ([\d.]+)", savings(_site(window=256), h100)).group(1))
    # a 256-key band computes 1/8 of the causal scores and becomes bound by reading q, k, v (537 MB at 3.35 TB/s)
    assert 155 < band < 165, (band, fused)
    assert "roofline" not in savings(_site(), Target(kind="cpu"))   # no peaks known for a CPU
    assert "roofline" not in savings(_site(), Target(kind="cuda", arch=75, name="Tesla T4"))


def test_paged_site_saves_the_gather():
    site = _site(t=64)
    site.op, site.spec["op"], site.memory = "paged_attention", "paged_attention", {"unfused_bytes": None, "note": ""}
    # K and V [4, 32, 64, 128] bf16: 2 x 2 MiB the gather would have written
    assert savings(site).startswith("the gathered K/V copy (4.0 MiB) is not made")


def test_report_to_json_keeps_the_new_fields():
    r = CompileReport(graph_id=0, sites=[_site()])
    r.sites[0].choice, r.sites[0].saves = "flash; not sliding", "1 MiB"
    d = r.to_dict()
    assert d["sites"][0]["choice"] == "flash; not sliding" and d["sites"][0]["saves"] == "1 MiB"


def test_explain_says_which_kernels_the_first_call_compiles(monkeypatch, capsys):
    from attnlower.compiler import backend
    from attnlower.report import compiles

    (cpu,) = attnlower.inspect(Causal(), *_qkv(), options={"inner": "eager", "explain": True})
    assert "kernels: none compiled" in cpu.kernels and cpu.kernels in capsys.readouterr().out
    monkeypatch.setattr(backend, "target_for", lambda device: Target(kind="interpret"))
    (interp,) = attnlower.inspect(Causal(), *_qkv(), options={"inner": "eager", "explain": True})
    assert "the first call compiles _flash_fwd_kernel (site 0)" in interp.kernels, interp.kernels
    compiles.record_kernel_compile("_flash_fwd_kernel", "BLOCK_M=64, BLOCK_N=64", 1.25)
    assert "compiled Triton kernel _flash_fwd_kernel (BLOCK_M=64, BLOCK_N=64) in 1.25 s" in capsys.readouterr().out
    assert compiles.KERNEL_COMPILES[-1]["seconds"] == 1.25


def test_triton_compiles_of_attnlower_kernels_are_timed(monkeypatch, capsys):
    """On CUDA, explain times each kernel compile through Triton's JIT hooks (the interpreter never
    compiles, so the hooks are driven here the way triton.runtime.jit calls them)."""
    import types

    knobs = pytest.importorskip("triton").knobs
    from attnlower.report import compiles

    theirs = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: theirs.append(kw["key"]))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    monkeypatch.setattr(compiles, "_WATCHING", False)
    monkeypatch.setattr(compiles, "_EXPLAINING", True)
    assert compiles.watch_triton_compiles()
    ours = types.SimpleNamespace(module="attnlower.lowering.kernels.flash_fwd", name="_flash_fwd_kernel")
    other = types.SimpleNamespace(module="user.kernels", name="my_kernel")
    compile_kw = {"num_warps": 4, "num_stages": 3}
    for key, fn in (("k1", ours), ("k2", other)):
        assert not knobs.runtime.jit_cache_hook(key=key, repr="", fn=fn, compile=compile_kw,
                                                 is_manual_warmup=False, already_compiled=False)
        knobs.runtime.jit_post_compile_hook(key=key, repr="", fn=fn, compile=compile_kw,
                                            is_manual_warmup=False, already_compiled=False)
    out = capsys.readouterr().out
    assert re.search(r"compiled Triton kernel _flash_fwd_kernel \(num_warps=4, num_stages=3\) in [\d.]+ s", out), out
    assert "my_kernel" not in out and theirs == ["k1", "k2"]    # the user's hook still runs, for every kernel


def test_op_choice_says_what_documents_do():
    """Document mode skips the blocks of other documents; a document mask the op cannot take yet is a bias, and
    the choice says why (not the generic "no band proven")."""
    from attnlower.report.records import Site
    from attnlower.report.words import op_choice

    fused = Site(0, "f.py:1 in f: x", "sdpa", op="flash_attention", reason="causal",
                 spec={"causal": True, "documents": True, "bias_kind": "none", "mask_kind": "causal+document"})
    assert op_choice(fused).startswith("flash; documents: key blocks of other documents skipped")
    bias = Site(0, "f.py:1 in f: x", "sdpa", op="flash_attention", reason="band+document mask passed as a bias",
                spec={"documents": False, "bias_kind": "bool", "mask_kind": "band+document"})
    assert "needs the op's doc_ids" in op_choice(bias)


# ---- a mask read off a module buffer: what keeps it true, said as it is (issue 22, class 1) ---------------

class NanoGPTWithMasks(nn.Module):
    """nanoGPT's attention (`register_buffer("bias", tril(...))`, `bias[:, :, :T, :T]`) as forks extend it: and-ed
    with HF-style key padding (`attention_mask[:, None, None, :]`), or with packed sequences whose position ids
    restart at 0 (a document mask)."""

    def __init__(self, extra: str | None = None, block_size: int = 64):
        super().__init__()
        self.extra = extra
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, q, k, v, extra=None):
        t = q.size(-2)
        keep = self.bias[:, :, :t, :t] != 0
        if self.extra == "padding":
            keep = keep & extra.bool()[:, None, None, :]
        elif self.extra == "documents":
            doc = (extra == 0).cumsum(-1)
            keep = keep & (doc[:, None, :, None] == doc[:, None, None, :])
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        return F.softmax(att.masked_fill(~keep, float("-inf")), dim=-1) @ v


def _buffer_case(extra):
    t = 37
    q, k, v = _qkv(t, 16)
    if extra == "padding":
        data = torch.ones(2, t, dtype=torch.long)
        data[0, :5] = 0
    elif extra == "documents":
        data = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in ((10, 20, 7), (30, 7))])
    else:
        data = None
    return NanoGPTWithMasks(extra).eval(), (q, k, v) + ((data,) if data is not None else ())


def _recompiles_after_an_in_place_write(model, args) -> int:
    """Compile `model`, write its buffer in place (a value the causal pattern still holds), call again: how many
    graphs the second call compiled (1: the host guard saw the write; 0: no guard on the buffer)."""
    from attnlower.report.records import reports

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnlower", options={"inner": "eager"})
    compiled(*args)
    start = len(reports())
    with torch.no_grad():
        model.bias[0, 0, 20, 3] = 0.0           # one key hidden from one query
    torch.testing.assert_close(compiled(*args), model(*args), equal_nan=True)
    return len(reports()) - start


GUARDED = "guarded: a change to `self.bias` (in place, or a new tensor) recompiles"


def test_a_buffer_structure_checked_on_the_device_says_guard_and_check():
    """nanoGPT: causal from the buffer's value, behind the host guard and the op's device check."""
    model, args = _buffer_case(None)
    (report,) = attnlower.inspect(model, *args, options={"inner": "eager"})
    (site,) = report.sites
    assert site.spec["causal"] and site.spec["verified"], str(report)
    assert "proven from the value of buffer `self.bias`" in site.reason, site.reason
    assert GUARDED in site.reason and "checked on the device each call" in site.reason, site.reason
    assert "not checked on the device" not in site.reason and "no guard needed" not in site.reason, site.reason
    assert _recompiles_after_an_in_place_write(model, args) == 1


def test_a_buffer_structure_behind_the_host_guard_alone_says_so():
    """nanoGPT with packed sequences: causal from the buffer, documents as doc_ids; the device check compares the
    whole mask with the structure, so it is not made here: the reason names the guard and what it misses."""
    model, args = _buffer_case("documents")
    (report,) = attnlower.inspect(model, *args, options={"inner": "eager"})
    (site,) = report.sites
    assert site.spec["causal"] and site.spec["documents"] and not site.spec["verified"], str(report)
    assert "proven from the value of buffer `self.bias`" in site.reason, site.reason
    assert GUARDED in site.reason, site.reason
    assert re.search(r"not checked on the device \(.*documents.*\): a write through the buffer's `\.data` or a "
                     r"NumPy alias is not seen", site.reason), site.reason
    assert "checked on the device each call" not in site.reason, site.reason
    assert _recompiles_after_an_in_place_write(model, args) == 1


def test_a_buffer_mask_kept_as_the_bias_claims_no_guard():
    """nanoGPT's buffer and-ed with key padding: the mask is the op's bias, read each call; nothing is guarded
    (an in-place write recompiles nothing and is seen all the same), and the reason says so."""
    model, args = _buffer_case("padding")
    (report,) = attnlower.inspect(model, *args, options={"inner": "eager"})
    (site,) = report.sites
    assert site.mask == "causal+padding" and site.spec["bias_kind"] == "bool", str(report)
    assert not site.spec["causal"] and not site.spec["verified"], str(report)
    assert "proven from the value of buffer `self.bias`" in site.reason, site.reason
    assert "guarded" not in site.reason and "recompiles" not in site.reason, site.reason
    assert "checked on the device" not in site.reason, site.reason
    assert "no guard needed: the op's bias reads `self.bias` each call" in site.reason, site.reason
    assert "skips no key block (beside padding" in site.reason, site.reason
    assert not INTERNAL.search(site.reason), site.reason
    assert _recompiles_after_an_in_place_write(model, args) == 0
