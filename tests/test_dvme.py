"""DVME (Truong et al. 2021): parameter count of the paper's configuration, shapes, attention map, input handling,
gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.networks.dvme import DVME, MetaEmbeddingAttention

PAPER_DIMS = {"simclr": 2048, "swav": 2048, "dino": 1536}  # SimCLR / SwAV ResNet-50, DINO ViT-S/8 last-4 CLS
SMALL_DIMS = {"a": 12, "b": 7, "c": 9}
MODES = ("scalar", "none", "per_encoder")


def small_model(attention: str, **kwargs) -> DVME:
    torch.manual_seed(0)
    kwargs.setdefault("num_heads", 2 if attention == "per_encoder" else None)
    return DVME(SMALL_DIMS, proj_dim=8, num_classes=3, attention=attention, **kwargs)


def small_inputs(batch: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, dim, generator=generator) for name, dim in SMALL_DIMS.items()}


def linear_count(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def test_parameter_count_matches_paper_linear_evaluation(capsys):
    model = DVME(PAPER_DIMS, proj_dim=512, num_classes=2, attention="scalar")
    breakdown = model.parameter_breakdown()
    with capsys.disabled():
        print("\nDVME trainable parameters in linear evaluation (encoders {2048, 2048, 1536}, proj 512, 2 classes):")
        for part, count in breakdown.items():
            print(f"  {part:<22} {count:>10,}")
        print("  spec target: about 3.67 M; paper (Truong et al., Table G1): 3.6 M for DVME linear evaluation")
    # every parameter is trainable, and the breakdown covers all of them
    assert breakdown["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert breakdown["total"] == sum(v for k, v in breakdown.items() if k != "total")
    for name, dim in PAPER_DIMS.items():
        assert breakdown[f"projections.{name}"] == linear_count(dim, 512)
    assert breakdown["hidden"] == linear_count(3 * 512, 512)
    assert breakdown["norm"] == 2 * 3 * 512
    assert breakdown["classifier"] == linear_count(512, 2)
    assert 0 < breakdown["attention"] <= 6  # scalar tokens: qkv 1→3 (no bias) + proj 1→1 with bias
    assert abs(breakdown["total"] - 3.67e6) / 3.67e6 < 0.01
    # the ablation differs by exactly the attention module
    ablation = DVME(PAPER_DIMS, attention="none").parameter_breakdown()
    assert ablation["total"] == breakdown["total"] - breakdown["attention"]
    # the full-size scalar-token model runs: 1536 tokens per sample
    logits = model(
        {name: torch.randn(2, dim, generator=torch.Generator().manual_seed(3)) for name, dim in PAPER_DIMS.items()}
    )
    assert logits.shape == (2, 2)
    assert model.last_attention_map.shape == (3, 3)


def test_frozen_parameters_are_not_counted_as_trainable():
    model = small_model("scalar")
    model.projections["a"].requires_grad_(False)
    trainable = model.parameter_breakdown()
    everything = model.parameter_breakdown(trainable_only=False)
    assert trainable["projections.a"] == 0
    assert everything["projections.a"] == linear_count(12, 8)
    assert everything["total"] - trainable["total"] == linear_count(12, 8)


@pytest.mark.parametrize("attention", MODES)
def test_shapes(attention):
    model = small_model(attention)
    inputs = small_inputs(batch=5)
    logits = model(inputs)
    assert logits.shape == (5, 3)
    assert model.embed(inputs).shape == (5, 8)
    assert model.meta_embedding(inputs).shape == (5, 3 * 8)
    if attention == "none":
        assert model.attention is None
        assert model.last_attention_map is None and model.last_sample_attention_maps is None
    else:
        assert model.last_attention_map.shape == (3, 3)
        assert model.last_sample_attention_maps.shape == (5, 3, 3)
        assert not model.last_attention_map.requires_grad


@pytest.mark.parametrize("attention", ["scalar", "per_encoder"])
def test_attention_map_rows_sum_to_one(attention):
    model = small_model(attention)
    model(small_inputs(batch=4))
    attention_map = model.last_attention_map
    assert attention_map.shape == (len(SMALL_DIMS), len(SMALL_DIMS))
    assert torch.all(attention_map >= 0)
    torch.testing.assert_close(attention_map.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(model.last_sample_attention_maps.sum(dim=2), torch.ones(4, 3))
    torch.testing.assert_close(attention_map, model.last_sample_attention_maps.mean(dim=0))


def test_scalar_attention_map_groups_tokens_by_encoder():
    """Recompute the encoder map by explicit loops over the token weights of the listing's (B, E·P, 1) layout."""
    model = small_model("scalar")
    inputs = small_inputs(batch=3)
    model(inputs)
    with torch.no_grad():
        meta = torch.cat([model.projections[n](inputs[n]) for n in SMALL_DIMS], dim=1)
        _, weights = model.attention(meta.reshape(3, -1, 1))
    assert weights.shape == (3, 1, 24, 24)  # one head, every scalar a token
    expected = torch.zeros(3, 3)
    for i in range(3):
        for j in range(3):
            block = weights[:, 0, i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8]
            expected[i, j] = block.sum(dim=2).mean()  # share of i's queries on j's keys, averaged over samples
    torch.testing.assert_close(model.last_attention_map, expected)


@pytest.mark.parametrize("num_heads,dim", [(1, 1), (2, 8)])
def test_attention_module_is_vit_scaled_dot_product(num_heads, dim):
    torch.manual_seed(0)
    module = MetaEmbeddingAttention(dim, num_heads)
    assert module.qkv.bias is None
    assert module.scale == pytest.approx((dim // num_heads) ** -0.5)
    tokens = torch.randn(2, 6, dim)
    out, weights = module(tokens)
    q, k, v = module.qkv(tokens).reshape(2, 6, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
    reference = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 6, dim)
    torch.testing.assert_close(out, module.proj(reference))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, num_heads, 6))


@pytest.mark.parametrize("attention", MODES)
def test_dict_key_order_and_concatenated_input_give_same_result(attention):
    model = small_model(attention).eval()
    inputs = small_inputs()
    reordered = {name: inputs[name] for name in reversed(list(inputs))}
    concatenated = torch.cat([inputs[name] for name in model.encoder_names], dim=1)
    assert model.split_sizes == [12, 7, 9]
    with torch.no_grad():
        reference = model(inputs)
        reference_map = model.last_attention_map
        torch.testing.assert_close(model(reordered), reference, rtol=0, atol=0)
        if reference_map is not None:
            torch.testing.assert_close(model.last_attention_map, reference_map, rtol=0, atol=0)
        # split views are strided, so the Linear may take another kernel: equal up to float rounding
        torch.testing.assert_close(model(concatenated), reference)
    # the canonical order is the constructor's: same weights under a reversed constructor order lay the
    # meta-embedding out differently, so the result changes
    reversed_dims = dict(reversed(list(SMALL_DIMS.items())))
    heads = model.attention.num_heads if model.attention is not None else None
    reversed_model = DVME(reversed_dims, proj_dim=8, num_classes=3, attention=attention, num_heads=heads).eval()
    reversed_model.load_state_dict(model.state_dict())
    assert reversed_model.encoder_names == ("c", "b", "a") and reversed_model.split_sizes == [9, 7, 12]
    with torch.no_grad():
        assert not torch.allclose(reversed_model(inputs), reference)


@pytest.mark.parametrize("attention", MODES)
def test_dropout_off_in_eval_is_deterministic(attention):
    model = small_model(attention, dropout=0.5)
    inputs = small_inputs(batch=16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), model(inputs), rtol=0, atol=0)
    model.train()
    torch.manual_seed(5)
    first = model(inputs)
    second = model(inputs)
    assert not torch.equal(first, second)  # dropout is active in training mode


@pytest.mark.parametrize("attention", MODES)
def test_gradients_reach_every_projection(attention):
    model = small_model(attention).train()
    torch.manual_seed(2)
    logits = model(small_inputs(batch=6))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name
    assert {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("projections.")} == set(SMALL_DIMS)


def test_input_errors_name_the_problem():
    model = small_model("scalar")
    inputs = small_inputs()
    with pytest.raises(KeyError, match="missing \\['c'\\]"):
        model({k: v for k, v in inputs.items() if k != "c"})
    with pytest.raises(KeyError, match="unexpected \\['d'\\]"):
        model(dict(inputs, d=inputs["a"]))
    with pytest.raises(ValueError, match="input\\['b'\\] must be \\(B, 7\\)"):
        model(dict(inputs, b=torch.randn(5, 6)))
    with pytest.raises(ValueError, match="\\(B, 28\\)"):
        model(torch.randn(5, 27))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(dict(inputs, b=torch.randn(4, 7)))
    with pytest.raises(ValueError, match="attention='bogus'"):
        DVME(SMALL_DIMS, attention="bogus")
    with pytest.raises(ValueError, match="num_heads must be 1"):
        DVME(SMALL_DIMS, attention="scalar", num_heads=2)
    with pytest.raises(ValueError, match="not divisible"):
        DVME(SMALL_DIMS, proj_dim=10, attention="per_encoder", num_heads=4)
    with pytest.raises(ValueError, match="without '.'"):
        DVME({"a.b": 3})
    with pytest.raises(ValueError, match="positive int"):
        DVME({"a": 0})
