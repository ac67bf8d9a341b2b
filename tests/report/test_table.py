"""The site table (`print(report)`) and sites.md, as a user reads them (issue 24 item 3): each site says what
translation validation checked it on, or why it was not checked; `enable=False` says the passes were off, not
that nothing was found; a refused site shows the mask it had; long cells wrap between words, never cut."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import attnlower
from attnlower.passes import kv
from attnlower.passes import validate as V
from attnlower.passes import verdicts
from attnlower.report.dump import site_table_markdown
from attnlower.report.records import CompileReport, Site


@pytest.fixture(autouse=True)
def _fresh_validation_cache():
    verdicts.clear_cache()   # verdicts are cached per process by structure: each test checks its own sites
    yield
    verdicts.clear_cache()


def _causal_scores(q, k, fill=float("-inf")):
    t = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    return att.masked_fill(torch.tril(torch.ones(t, t, dtype=torch.bool)).logical_not(), fill)


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(_causal_scores(q, k), dim=-1) @ v


class FiniteFill(torch.nn.Module):
    """A causal mask filled with -1e4, then again with -1e3: refused (two different finite fills; the op's fill
    mode takes one), after the mask was classified."""

    def forward(self, q, k, v):
        t = q.size(-2)
        hidden = torch.tril(torch.ones(t, t, dtype=torch.bool)).logical_not()
        return torch.softmax(_causal_scores(q, k, fill=-1e4).masked_fill(hidden, -1e3), dim=-1) @ v


class NoAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return q + k * v


def _qkv(t=13, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, t, d, generator=g) for _ in range(3)]


def _inspect(model, **options):
    (report,) = attnlower.inspect(model, *_qkv(), options={"inner": "eager", **options})
    return report


def _row(report: CompileReport) -> str:
    """The table without its first line, as one string with the wrapping undone (words joined by one space)."""
    return " ".join(report.table().split("\n", 1)[1].split())


# ---- validation status --------------------------------------------------------------------------

def test_a_validated_site_says_what_it_was_checked_on_in_the_table_and_sites_md():
    report = _inspect(Causal())
    (site,) = report.sites
    assert site.rewritten and site.validated.startswith("float64 CPU")
    assert f"validation: passed on {site.validated}" in _row(report), report.table()
    assert site_table_markdown(report).splitlines()[-1].endswith(f"| passed on {site.validated} |")


def test_validate_false_says_not_checked():
    report = _inspect(Causal(), validate=False)
    assert "validation: not checked: options validate=False" in _row(report), report.table()
    assert site_table_markdown(report).splitlines()[-1].endswith("| not checked: options validate=False |")


def test_a_site_refused_by_validation_says_it_failed_and_on_what(monkeypatch, tmp_path):
    resolve = kv.resolve_match

    def drop_scale(chain):   # a broken detector: the rewrite forgets the 1/sqrt(d) scale
        match = resolve(chain)
        match.scale = 1.0
        return match
    monkeypatch.setattr(kv, "resolve_match", drop_scale)
    report = _inspect(Causal(), repro_dir=str(tmp_path))
    (site,) = report.sites
    assert not site.rewritten and site.reason.startswith("translation validation failed")
    assert f"validation: failed on {site.validated}" in _row(report), report.table()


def test_a_site_refused_before_the_rewrite_says_why_it_was_not_checked():
    report = _inspect(Causal(), ops=("sliding_window_attention",))
    assert "validation: not checked: the site was not rewritten" in _row(report), report.table()
    assert "| not checked: the site was not rewritten |" in site_table_markdown(report)


def test_a_site_too_large_to_check_says_so(monkeypatch):
    """A site too large to evaluate whole, inside a torch.utils.checkpoint body (no first-call check runs
    there), stays fused and the table says it was not validated and why."""
    from torch.utils.checkpoint import checkpoint

    class CheckpointedCausal(torch.nn.Module):
        def forward(self, q, k, v):
            return checkpoint(Causal(), q, k, v, use_reentrant=False)

    monkeypatch.setattr(V, "MAX_ELEMENTS", 1000)
    report = _inspect(CheckpointedCausal())
    (site,) = report.sites
    assert site.rewritten and site.validated.startswith("not validated"), site.validated
    assert f"validation: {' '.join(site.validated.split())}" in _row(report), report.table()


# ---- enable=False -------------------------------------------------------------------------------

def test_enable_false_says_the_passes_were_off_not_that_nothing_was_found():
    off = _inspect(Causal(), enable=False)
    nothing = _inspect(NoAttention())
    assert not off.sites and not nothing.sites
    assert "passes off (options enable=False)" in off.table() and "0 attention site" not in off.table()
    assert "0 attention site(s), 0 rewritten" in nothing.table() and "passes off" not in nothing.table()
    assert "Passes off (options enable=False)" in site_table_markdown(off)
    assert "0 site(s), 0 rewritten" in site_table_markdown(nothing)
    assert not off.to_dict()["passes_enabled"] and nothing.to_dict()["passes_enabled"]


# ---- the mask of a refused site ---------------------------------------------------------------------

def test_a_refused_site_shows_the_mask_it_had():
    report = _inspect(FiniteFill())
    (site,) = report.sites
    assert not site.rewritten and "different finite values (-10000 and -1000)" in site.reason, site.reason
    assert site.mask == "causal", site.mask
    header, row = report.table().splitlines()[1:3]
    assert row.split()[row.split().index("(unfused)") - 1] == "causal", report.table()


def test_a_site_refused_before_its_mask_was_classified_does_not_claim_none(monkeypatch):
    """Refused in resolve_kv (before classify_masks): its one mask term is reported unclassified, not `none`."""
    from attnlower.passes.site import Refused

    def untraceable(chain):
        raise Refused("K/V could not be traced (test)")
    monkeypatch.setattr(kv, "resolve_match", untraceable)
    report = _inspect(Causal())
    (site,) = report.sites
    assert not site.rewritten and site.reason == "K/V could not be traced (test)"
    assert site.mask == "fill term, unclassified", site.mask


# ---- wrapping ---------------------------------------------------------------------------------------

def _long_site(index=0, **changes) -> Site:
    site = Site(index=index, spelling="matmul-softmax-matmul",
                location="a_rather_long_model_file_name.py:1234 in forward: attn_weights = "
                         "F.scaled_dot_product_attention(query_states, key_states, value_states, attn_mask=mask)",
                shapes={"q": "[2, 32, 4096, 128]", "k": "[2, 8, 4096, 128]", "v": "[2, 8, 4096, 128]"},
                mask="causal+padding", reason="K/V are not views of one pool pair: `key_states` comes from "
                "`torch.cat(past_key, new_key)` and the paged op reads a block table", validated="")
    return dataclasses.replace(site, **changes)


def test_long_cells_wrap_between_words_and_nothing_is_cut():
    report = CompileReport(graph_id=7, sites=[_long_site(), _long_site(1, location="short.py:1 in f: x")])
    table = report.table()
    words = set(table.split())
    for site in report.sites:
        for text in (site.location, site.reason, site.mask):
            for word in text.split():   # every word whole: lines break between words only
                assert word in words, (word, table)
        for shape in site.shapes.values():   # a shape is never broken inside
            assert shape in table, (shape, table)
    assert "attn_weights" in words and "F.scaled_dot_product_attention(query_states," in words
    lines = table.splitlines()
    longest_unit = max(len(w) for w in _long_site().location.split())
    assert max(len(line) for line in lines) <= 4 + 56 + 40 + 24 + 26 + 72 + 2 * 6 + longest_unit


def test_a_word_longer_than_its_column_widens_the_column():
    path = "/very/long/path/to/some/deeply/nested/package/directory/with/a/model/module_file_name.py:77"
    report = CompileReport(graph_id=1, sites=[_long_site(location=path)])
    assert path in report.table()


def test_columns_line_up_on_every_wrapped_line():
    """Each physical line of a wrapped row keeps its text inside the columns the header sets out."""
    report = CompileReport(graph_id=3, sites=[_long_site(), _long_site(1, location="short.py:1 in f: x")])
    lines = report.table().splitlines()[1:]
    header = lines[0]
    starts = [header.index(name) for name in ("location", "q / k / v", "mask", "op", "why")]
    rows = [ln for ln in lines[1:] if not ln.strip().startswith(("op:", "saves:", "validation:"))]
    assert len(rows) > len(report.sites)   # the long site wrapped onto several lines
    for line in rows:
        for c in starts:
            assert len(line) < c or line[c - 1] == " ", (c, line, header)
