"""BLT and entropy model: initialisation, architecture variants, batch-row independence, back-ends."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.models import make, variants
from torchblt import BLT, ByteTokenizer, Patcher
from torchblt.formats.common import build_model
from torchblt.model.blt import check_patch_lengths
from torchblt.model.config import (
    blt_1b,
    blt_7b,
    entropy_100m,
    tiny_blt,
    tiny_entropy,
)
from torchblt.model.masks import set_attention_backend
from torchblt.model.transformer import Linear, StackConfig, ffn_hidden_dim


def test_init_weights_covers_every_parameter():
    for cfg in [*variants().values(), tiny_entropy()]:
        model = build_model(cfg, device="meta")
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        model.init_weights()
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"{name} left uninitialised"
            assert p.std() > 0 or p.numel() == 1 or name.endswith("norm.weight") or "norm" in name, name
        for module in model.modules():
            rope = getattr(module, "rope", None)
            if rope is not None:
                assert torch.isfinite(rope.inv_freq).all()


@pytest.mark.parametrize("name", list(variants()))
def test_variants_forward_backward(name):
    cfg = variants()[name]
    model = make(cfg)
    tok = ByteTokenizer()
    tokens = torch.tensor([tok.encode("The cat sat on the mat. A BLT has bytes!", add_eos=True) + tok.encode("x y")[:3]])
    mode = cfg.patching.mode if cfg.patching.mode != "entropy" else "space"
    lengths, _ = Patcher(mode=mode, patch_size=cfg.patching.patch_size).patch(tokens, include_next_token=True)
    if mode == "static":
        from torchblt.patching import split_first_patch

        lengths = split_first_patch(lengths)
    model.train()
    logits = model(tokens, patch_lengths=lengths)
    assert logits.shape == (1, tokens.shape[1], 260) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n


def test_batch_rows_are_independent():
    """Each row of a right-padded batch gets the logits it gets alone (on its real positions)."""
    model = make(variants()["all_layers_windows_gqa"])
    tok = ByteTokenizer()
    texts = ["Hello world, this is row one.", "Row two is shorter", "and 3"]
    patcher = Patcher(mode="space")
    rows = [torch.tensor([tok.encode(t, add_eos=False)]) for t in texts]
    T = max(r.shape[1] for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    lengths = []
    for b, r in enumerate(rows):
        tokens[b, : r.shape[1]] = r[0]
        pl, _ = patcher.patch(r, include_next_token=True)
        pl = pl[0].clone()
        pl[-1] += T - r.shape[1]  # padding joins the last patch
        lengths.append(pl)
    P = max(len(p) for p in lengths)
    batch_lengths = torch.stack([torch.nn.functional.pad(p, (0, P - len(p))) for p in lengths])
    with torch.no_grad():
        batched = model(tokens, patch_lengths=batch_lengths)
        for b, r in enumerate(rows):
            alone = model(r, patch_lengths=patcher.patch(r, include_next_token=True)[0])
            torch.testing.assert_close(batched[b, : r.shape[1]], alone[0], atol=1e-5, rtol=0)


def test_flex_backend_equals_sdpa():
    model = make(variants()["all_layers_windows_gqa"])
    tokens = torch.tensor([ByteTokenizer().encode("Sliding windows, documents\nand padding. " * 3)])
    lengths, _ = Patcher(mode="space").patch(tokens, include_next_token=True)
    with torch.no_grad():
        sdpa = model(tokens, patch_lengths=lengths)
        set_attention_backend("flex")
        try:
            flex = model(tokens, patch_lengths=lengths)
        finally:
            set_attention_backend("auto")
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


def test_forward_without_patch_lengths_uses_model_patcher():
    cfg = dataclasses.replace(tiny_blt(), patching=dataclasses.replace(tiny_blt().patching, mode="space"))
    model = make(cfg)
    tokens = torch.tensor([ByteTokenizer().encode("patch me inside forward", add_eos=False)])
    lengths, _ = Patcher(mode="space").patch(tokens, include_next_token=True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model(tokens, patch_lengths=lengths))
    entropy_cfg = make(tiny_blt())
    with pytest.raises(ValueError, match="entropy_model"):
        entropy_cfg(tokens)


def test_blt_is_a_plain_module_and_the_patcher_belongs_to_the_caller():
    """No patcher or entropy model inside the BLT: ``patcher=`` patches a forward without patch lengths;
    an attached entropy model lives beside the model (not in its attributes, parameters or state dict)."""
    import copy

    from torchblt.formats.common import build_model
    from torchblt.model.config import tiny_entropy
    from torchblt.patching import attach_entropy_model, attached_entropy_model

    model = make(tiny_blt())
    em = build_model(tiny_entropy(), "cpu")
    em.init_weights()
    tokens = torch.tensor([ByteTokenizer().encode("patched by the caller", add_eos=False)])
    patcher = Patcher(model.config.patching, em.eval())
    lengths, _ = patcher.patch(tokens, include_next_token=True)
    names = set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, patcher=patcher), model(tokens, lengths))
        attach_entropy_model(model, em)
        torch.testing.assert_close(model(tokens), model(tokens, lengths))
    assert attached_entropy_model(model) is em and Patcher.for_model(model).entropy_model is em
    assert set(model.state_dict()) == names and not any(v is em for v in vars(model).values())
    assert attached_entropy_model(copy.deepcopy(model)) is None  # a copy is a new, unpaired module
    attach_entropy_model(model, None)
    assert attached_entropy_model(model) is None
    with pytest.raises(ValueError, match="not a BLT"):
        Patcher.for_model(em)


def test_patch_length_contract_errors():
    tokens = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="sum to T \\+ 1"):
        check_patch_lengths(torch.tensor([[1, 2, 2]]), tokens)
    with pytest.raises(ValueError, match="first patch"):
        check_patch_lengths(torch.tensor([[2, 2, 2]]), tokens)
    with pytest.raises(ValueError, match="shape"):
        check_patch_lengths(torch.tensor([1, 5]), tokens)


def test_named_configs_on_meta():
    counts = {}
    for name, cfg in {"blt-1b": blt_1b(), "blt-7b": blt_7b(), "entropy-100m": entropy_100m()}.items():
        model = build_model(cfg, device="meta")
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts["entropy-100m"] == 99_512_064  # the spec's count for the released entropy model
    g1 = build_model(blt_1b(), device="meta").global_transformer
    assert sum(p.numel() for p in g1.parameters()) == 1_284_608_000  # paper: global ~1.28B
    m7 = build_model(blt_7b(), device="meta")
    assert m7.global_transformer.token_embedding_projection.weight.shape == (4096, 5120)  # 1280 * k=4 -> 4096
    assert ffn_hidden_dim(1280, 256, 1.0) == 3584 and ffn_hidden_dim(1024, 256, 1.0) == 2816


def test_config_validation_errors():
    bad = dataclasses.replace(tiny_blt(), global_=dataclasses.replace(tiny_blt().global_, attention="local_block_causal", window=4))
    with pytest.raises(ValueError, match="global_.attention"):
        BLT(bad)
    with pytest.raises(ValueError, match="window"):
        StackConfig(dim=8, n_layers=1, n_heads=2, attention="local_block_causal").validate("encoder")
    with pytest.raises(ValueError, match="divisible"):
        StackConfig(dim=10, n_layers=1, n_heads=3).validate("encoder")


def test_linear_small_rows_product_equals_linear():
    """``Linear`` multiplies 2-3 rows as ``W @ x.T`` outside autograd (one pass over the weight) and is
    ``F.linear`` everywhere else: the same values, a contiguous result, nn.Linear's parameters."""
    from unittest import mock

    import torch.nn.functional as F

    torch.manual_seed(0)
    layer = Linear(48, 40, bias=False)
    assert list(layer.state_dict()) == ["weight"] and isinstance(layer, torch.nn.Linear)
    for shape in [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (2, 3)]:
        x = torch.randn(*shape, 48)
        rows = x.numel() // 48
        with torch.inference_mode(), mock.patch("torch.mm", wraps=torch.mm) as mm:
            out = layer(x)
        assert mm.called == (2 <= rows <= 3), shape
        assert out.shape == (*shape, 40) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)
        # training: exactly F.linear, and gradients flow
        y = layer(x)
        assert torch.equal(y, F.linear(x, layer.weight))
        y.sum().backward()
        assert layer.weight.grad is not None
        layer.weight.grad = None
    with torch.inference_mode(), mock.patch("torch.mm", wraps=torch.mm) as mm:  # bf16: F.linear
        layer.to(torch.bfloat16)(torch.randn(2, 1, 48, dtype=torch.bfloat16))
    assert not mm.called


def test_linear_one_row_uses_onednn_on_two_threads_for_large_weights(caplog):
    """One row, 2+ threads, a weight of at least ONEDNN_MIN_WEIGHTS, outside autograd: oneDNN's product
    (equal to F.linear to rounding); one thread, small weights, autograd: F.linear. A oneDNN that fails its
    check is turned off and logged once."""
    from unittest import mock

    import torch.nn.functional as F

    from torchblt.model import transformer

    torch.manual_seed(0)
    big = Linear(512, transformer.ONEDNN_MIN_WEIGHTS // 512, bias=False)
    small = Linear(48, 40, bias=False)
    threads = torch.get_num_threads()
    try:
        for n_threads, layer, x_shape, used in [(2, big, (1, 1, 512), True), (2, big, (1, 512), True),
                                                (1, big, (1, 1, 512), False), (2, small, (1, 1, 48), False),
                                                (2, big, (2, 1, 512), False)]:
            torch.set_num_threads(n_threads)
            x = torch.randn(*x_shape)
            with torch.inference_mode(), mock.patch.object(transformer, "onednn_row_product",
                                                           wraps=transformer.onednn_row_product) as row:
                out = layer(x)
            assert row.called == used, (n_threads, x_shape)
            assert out.shape == (*x_shape[:-1], layer.out_features)
            torch.testing.assert_close(out, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        torch.set_num_threads(2)
        with mock.patch.object(transformer, "onednn_row_product", wraps=transformer.onednn_row_product) as row:
            big(torch.randn(1, 512)).sum().backward()  # autograd records: F.linear
        assert not row.called and big.weight.grad is not None
        # a oneDNN whose op fails: F.linear, said once
        with mock.patch.object(transformer, "_onednn_state", None), \
                mock.patch("torch.ops.mkldnn._linear_pointwise", side_effect=RuntimeError("no such op")), \
                caplog.at_level("WARNING"), torch.inference_mode():
            x = torch.randn(1, 512)
            for _ in range(3):
                torch.testing.assert_close(big(x), F.linear(x, big.weight))
            assert transformer._onednn_state is False
        assert sum("oneDNN row product is off" in r.getMessage() for r in caplog.records) == 1
    finally:
        torch.set_num_threads(threads)
