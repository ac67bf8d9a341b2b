"""Inductor's and AOTAutograd's on-disk caches key on attnlower's op schemas (compiler/inductor.py).

A compiled graph cached before an op gained an argument would call the op with the old positional list; the
key must change with the schemas, and a user's own post-grad pass must be left alone."""
from __future__ import annotations

import torch
from torch._inductor import config

from attnlower.compiler import inductor
from attnlower.lowering import registry


def test_the_cache_key_holds_the_op_schemas(monkeypatch):
    with inductor.keyed_on_op_schemas():
        keyed = config.post_grad_custom_post_pass
        assert keyed is not None and keyed.uuid() == inductor._schema_hash()
        graph = torch.fx.Graph()
        assert keyed(graph) is None            # a no-op on the graph
    assert config.post_grad_custom_post_pass is None
    before = inductor._schema_hash()
    flash = registry.OPS["flash_attention"]
    monkeypatch.setattr(type(flash), "schema", property(lambda self: "(Tensor q) -> Tensor"))
    inductor._schema_hash.cache_clear()
    try:
        assert inductor._schema_hash() != before
    finally:
        monkeypatch.undo()
        inductor._schema_hash.cache_clear()
    assert inductor._schema_hash() == before


def test_a_users_post_grad_pass_is_kept():
    def mine(graph):
        return None

    with config.patch(post_grad_custom_post_pass=mine):
        with inductor.keyed_on_op_schemas():
            assert config.post_grad_custom_post_pass is mine
