"""The backend's options as torch.compile(..., options={...}) receives them: validation, explain, strict."""
from __future__ import annotations

import logging

import pytest
import torch

import attnlower
import dataclasses

from attnlower.passes import pipeline
from attnlower.report.records import reports
from attnlower.compiler.options import Options

import models as M

VALID = [name for name in ("inner", "explain", "strict", "enable", "ops", "dump_dir", "validate")]


def _causes(err: BaseException):
    """`err` and every exception behind it (Dynamo wraps backend errors in BackendCompilerFailed)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__


def _find(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((e for e in _causes(err) if isinstance(e, kind)), None)


def _compile_and_call(case: M.Case, options: dict):
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="attnlower", options=options)
    return compiled(*case.inputs.args, **case.inputs.kwargs)


def test_backend_is_found_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("attnlower") is not None


def test_unknown_option_raises_value_error_naming_valid_ones():
    case = M.handwritten("mul")
    with pytest.raises(Exception) as info:
        _compile_and_call(case, {"inner": "eager", "explian": True})
    err = _find(info.value, ValueError)
    assert err is not None, f"expected a ValueError behind {type(info.value).__name__}: {info.value}"
    msg = str(err)
    assert "explian" in msg, f"the message does not name the unknown option: {msg}"
    missing = [name for name in VALID if name not in msg]
    assert not missing, f"the message does not name the valid options {missing}: {msg}"


def test_unknown_option_through_inspect():
    case = M.handwritten("mul")
    with pytest.raises(Exception) as info:
        attnlower.inspect(case.model, *case.inputs.args, options={"strictt": True})
    err = _find(info.value, ValueError)
    assert err is not None and "strictt" in str(err) and "strict" in str(err).replace("strictt", "")


@pytest.mark.parametrize("options,word", [({"inner": "tvm"}, "inner"), ({"ops": ["flash", "paged_attention"]}, "ops")])
def test_bad_option_value_raises_value_error(options, word):
    with pytest.raises(ValueError, match=word):
        Options.from_mapping(options)
    case = M.handwritten("mul")
    with pytest.raises(Exception) as info:
        _compile_and_call(case, options)
    assert _find(info.value, ValueError) is not None


def test_explain_prints_the_site_table(capsys, caplog):
    case = M.nanogpt(flash=False)
    with caplog.at_level(logging.INFO, logger="attnlower"):
        _compile_and_call(case, {"inner": "eager", "explain": True})
    shown = capsys.readouterr().out + caplog.text
    assert "attnlower graph" in shown, f"no site table in the output: {shown!r}"
    assert "1 attention site(s), 1 rewritten" in shown, shown
    assert "flash_attention" in shown, shown
    assert "models.py" in shown, "the table should name the user's source line"


def test_no_explain_prints_nothing(capsys):
    _compile_and_call(M.nanogpt(flash=False), {"inner": "eager"})
    assert "attnlower graph" not in capsys.readouterr().out


class InjectedFailure(RuntimeError):
    pass


def _break_first_pass(monkeypatch):
    """Make the first stage of the pipeline raise InjectedFailure."""
    first, *rest = pipeline.STAGES

    def broken(gm, ctx):
        raise InjectedFailure(f"pass {first.name} forced to fail by the test")

    monkeypatch.setattr(pipeline, "STAGES", (dataclasses.replace(first, run=broken), *rest))
    return first.name


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_not_strict_logs_and_compiles_unmodified(monkeypatch, caplog, tmp_path, inner):
    """strict=False: a failing pass is logged as a warning, the graph is compiled unmodified
    (nothing rewritten, the report says why) and results are eager's."""
    _break_first_pass(monkeypatch)
    case = M.nanogpt(flash=False)
    reference = case.model(*case.inputs.args)
    results = []

    def call(x):
        results.append(case.model(x))
        return results[-1]

    with caplog.at_level(logging.WARNING):
        reports = attnlower.inspect(call, *case.inputs.args,
                                    options={"inner": inner, "strict": False, "repro_dir": str(tmp_path)})
    out = results[-1]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "forced to fail" in r.getMessage()]
    assert warnings, f"no warning logged for the failed pass: {[r.getMessage() for r in caplog.records]}"
    assert reports and all(r.error and "forced to fail" in r.error for r in reports)
    assert all(r.count() == 0 for r in reports), "a graph whose passes failed must not be rewritten"
    assert not torch.isnan(out).any()
    assert torch.equal(out, reference) if inner == "eager" else torch.allclose(out, reference, rtol=1e-5, atol=1e-6)


def test_strict_reraises(monkeypatch, tmp_path):
    _break_first_pass(monkeypatch)
    case = M.nanogpt(flash=False)
    with pytest.raises(Exception) as info:
        _compile_and_call(case, {"inner": "eager", "strict": True, "repro_dir": str(tmp_path)})
    assert _find(info.value, InjectedFailure) is not None, f"expected the pass's error, got {info.value!r}"


def test_default_is_not_strict(monkeypatch, tmp_path):
    _break_first_pass(monkeypatch)
    case = M.nanogpt(flash=False)
    out = _compile_and_call(case, {"inner": "eager", "repro_dir": str(tmp_path)})
    assert torch.equal(out, case.model(*case.inputs.args))


def test_enable_false_rewrites_nothing():
    case = M.nanogpt(flash=False)
    torch._dynamo.reset()
    reports = attnlower.inspect(case.model, *case.inputs.args, options={"inner": "eager", "enable": False})
    assert reports and sum(r.count() for r in reports) == 0


def test_ops_restricts_the_choice():
    """A site that needs an op not in `ops` stays unfused, with a reason."""
    case = M.hf_model("mistral", "sdpa", "cache")
    reports = attnlower.inspect(case.model, *case.inputs.args, options={"inner": "eager", "ops": ["flash_attention"]},
                                **case.inputs.kwargs)
    sites = [s for r in reports for s in r.sites]
    assert sites, "no sites found"
    assert all(s.op in (None, "flash_attention") for s in sites), [s.op for s in sites]
    assert all(s.reason for s in sites)


def test_validate_is_on_by_default_and_records_what_each_site_was_checked_on():
    case = M.nanogpt(flash=False)
    assert Options().validate is True
    reports = attnlower.inspect(case.model, *case.inputs.args, options={"inner": "eager"})
    sites = [s for r in reports for s in r.sites]
    assert sites and all(s.rewritten and s.validated.startswith("float64 CPU") for s in sites), \
        [(s.op, s.validated) for s in sites]
    assert [p["name"] for p in reports[0].passes] == ["functionalize", "find_anchors", "score_chain", "resolve_kv", "classify_masks",
                                                      "analyze", "rewrite", "validate", "clean_up"]


def test_validate_false_skips_the_check():
    case = M.nanogpt(flash=False)
    reports = attnlower.inspect(case.model, *case.inputs.args, options={"inner": "eager", "validate": False})
    sites = [s for r in reports for s in r.sites]
    assert sites and all(s.rewritten and s.validated == "not checked: options validate=False" for s in sites)


def test_validate_must_be_a_bool():
    with pytest.raises(ValueError, match="'validate' must be True or False, got 'no'"):
        Options.from_mapping({"validate": "no"})


# --------------------------------------------------------------------------------------------
# mode=: torch.compile(model, backend="attnlower", mode=M), the way PyTorch users turn on CUDA graphs


def _modes():
    from torch._inductor import list_mode_options

    return list(list_mode_options())


@pytest.mark.parametrize("mode", _modes())
def test_every_inductor_mode_is_accepted_with_parity(mode, monkeypatch):
    """Each mode torch.compile accepts for Inductor: the rewrite happens, the inner Inductor compile gets
    that mode's settings (what torch.compile(mode=M) would patch), and the result equals eager."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx as real_compile_fx
    import torch._inductor.compile_fx as compile_fx_module

    seen = []

    def recording_compile_fx(gm, inputs, *args, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return real_compile_fx(gm, inputs, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    case = M.handwritten("mul")
    torch._dynamo.reset()
    start = len(reports())
    compiled = torch.compile(case.model, backend="attnlower", mode=mode)
    got = compiled(*case.inputs.args, **case.inputs.kwargs)
    want = case.model(*case.inputs.args, **case.inputs.kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [r.count() for r in reports()[start:]] == [1]
    assert seen, "Inductor was not called"
    for key, value in list_mode_options(mode).items():
        assert seen[0].get(key) == value, f"mode={mode}: {key} should be {value}, Inductor got {seen[0]}"


def test_mode_in_options_and_its_errors():
    assert attnlower.check_options({"mode": "reduce-overhead"}).mode == "reduce-overhead"
    assert attnlower.check_options(mode="max-autotune").mode == "max-autotune"
    with pytest.raises(ValueError, match=r"option 'mode' must be one of Inductor's modes .*'reduce-overhead'.*got 'fast'"):
        attnlower.check_options(mode="fast")
    with pytest.raises(ValueError, match=r"inner='eager' runs the graph without Inductor"):
        attnlower.check_options({"inner": "eager", "mode": "reduce-overhead"})


@pytest.mark.parametrize("options,message", [
    ({"explain": "yes"}, r"option 'explain' must be True or False, got 'yes' \(str\)"),
    ({"strict": 1}, r"option 'strict' must be True or False, got 1 \(int\)"),
    ({"validate": "False"}, r"option 'validate' must be True or False"),
    ({"inner": "aot_eager"}, r"option 'inner' must be 'inductor' or 'eager', got 'aot_eager'"),
    ({"ops": "flash_attention"}, r"option 'ops' must be a list or tuple of op names"),
    ({"ops": ["flash"]}, r"unknown op\(s\) \['flash'\]"),
    ({"dump_dir": 3}, r"option 'dump_dir' must be a string \(a folder path\) or None, got 3"),
])
def test_check_options_says_which_option_what_came_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attnlower.check_options(options)


def test_an_option_error_in_torch_compile_leads_with_the_option():
    case = M.handwritten("mul")
    with pytest.raises(Exception) as info:
        _compile_and_call(case, {"explain": "yes"})
    text = str(info.value)
    assert "ValueError: attnlower option 'explain' must be True or False" in text, text


def test_path_options_take_a_pathlib_path(tmp_path):
    assert attnlower.check_options({"dump_dir": tmp_path}).dump_dir == str(tmp_path)


# --------------------------------------------------------------------------------------------
# static inputs: the graph attnlower hands Inductor keeps what Dynamo knew about its inputs


class _TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)
        self.register_buffer("scale", torch.tensor(0.25))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        w = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.out((w @ v).transpose(1, 2).reshape(b, t, 32))


def test_parameters_stay_static_inputs_for_inductor(monkeypatch):
    """Dynamo marks parameters and buffers as static inputs; AOTAutograd reads those marks from the graph
    (placeholder sources, `tensor_dict`) to tell CUDA graphs which inputs never change. The aten graph
    attnlower hands to Inductor carries the same marks, input for input, as Dynamo's graph."""
    import torch._inductor.compile_fx as compile_fx_module
    from attnlower.compiler import inductor

    received = []
    real = compile_fx_module.compile_fx

    def recording_compile_fx(gm, inputs, *args, **kwargs):
        received.append(gm)
        return real(gm, inputs, *args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    dynamo_graphs = []
    real_keep = inductor.keep_dynamo_input_facts

    def keep(dynamo_gm, gm):
        dynamo_graphs.append(dynamo_gm)
        return real_keep(dynamo_gm, gm)

    monkeypatch.setattr(inductor, "keep_dynamo_input_facts", keep)
    torch._dynamo.reset()
    model = _TwoLayer()
    x = torch.randn(2, 7, 32)
    start = len(reports())
    got = torch.compile(model, backend="attnlower")(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert reports()[-1].count() == 1 and len(reports()) == start + 1
    (gm,), (dynamo_gm,) = received, dynamo_graphs
    assert gm is not dynamo_gm and "dynamo_compile_id" in gm.meta
    ours, theirs = gm.graph.find_nodes(op="placeholder"), dynamo_gm.graph.find_nodes(op="placeholder")
    assert len(ours) == len(theirs)

    def static(node):
        return bool(node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))

    marks = [(n._dynamo_source, static(n)) for n in ours]
    assert marks == [(n._dynamo_source, static(n)) for n in theirs]
    # the 4 parameters and the buffer are static, the input x is not
    assert sum(s for _, s in marks) == 5 and [s for src, s in marks if "x" == getattr(src, "local_name", None)] == [False]


def test_input_facts_are_not_copied_between_graphs_that_do_not_correspond():
    from attnlower.compiler.inductor import keep_dynamo_input_facts

    def f(x, y):
        return x + y

    a = torch.fx.symbolic_trace(f)
    b = torch.fx.symbolic_trace(lambda x: x * 2)
    a.meta["dynamo_compile_id"] = "0/0"
    a._param_name_to_source = {}
    assert not keep_dynamo_input_facts(a, b)            # 2 inputs vs 1: nothing copied
    assert "dynamo_compile_id" not in b.meta
    assert not keep_dynamo_input_facts(torch.fx.symbolic_trace(f), torch.fx.symbolic_trace(f))  # not from Dynamo
