"""1-D deformable attention over slices (joint image-volume SSL, Nguyen et al. 2023, Eq. 6–8) and the transformer
f_inter."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.networks.deformable_attention import (
    DeformableSliceAttention,
    DeformableSliceTransformer,
    interpolate_slices,
    interpolate_table,
    sinusoidal_positions,
    volume_embedding,
)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


def small_attention(**kwargs) -> DeformableSliceAttention:
    torch.manual_seed(0)
    options = dict(embed_dim=20, num_slices=9, num_heads=6, head_dim=4, offset_groups=3, downsample=1)
    options.update(kwargs)
    return DeformableSliceAttention(**options)


def zero_offsets(attention: DeformableSliceAttention) -> DeformableSliceAttention:
    with torch.no_grad():
        attention.offset_out.weight.zero_()
    return attention


def reference_attention(attention: DeformableSliceAttention, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head self-attention over ALL slices, written independently of the module's sampling code:
    logits[h, i, j] = q_i·k_j / sqrt(d) + B̂[h, i − j + F_table − 1] (integer table lookup), softmax over j."""
    batch, length, _ = x.shape
    heads, dim = attention.num_heads, attention.head_dim

    def split(t):
        return t.reshape(batch, length, heads, dim).transpose(1, 2)

    q, k, v = split(attention.query(x)), split(attention.key(x)), split(attention.value(x))
    i = torch.arange(length).view(-1, 1)
    j = torch.arange(length).view(1, -1)
    bias = attention.position_bias[:, i - j + attention.num_slices - 1]  # (H, F, F), integer displacements
    logits = q @ k.transpose(-1, -2) / math.sqrt(dim) + bias
    out = torch.softmax(logits, dim=-1) @ v
    return attention.output(out.transpose(1, 2).reshape(batch, length, heads * dim))


# ---------------------------------------------------------------- interpolation


def test_interpolation_exact_at_integers_linear_between_zero_outside():
    torch.manual_seed(1)
    values = torch.randn(2, 5, 3)
    integers = torch.tensor([[0.0, 1.0, 4.0], [3.0, 2.0, 0.0]])
    sampled = interpolate_slices(values, integers)
    for n in range(2):
        for s in range(3):
            assert torch.equal(sampled[n, s], values[n, int(integers[n, s])])
    fractional = torch.tensor([[0.25, 2.5, 3.9]])
    sampled = interpolate_slices(values[:1], fractional)[0]
    expected = torch.stack(
        [
            0.75 * values[0, 0] + 0.25 * values[0, 1],
            0.5 * values[0, 2] + 0.5 * values[0, 3],
            0.1 * values[0, 3] + 0.9 * values[0, 4],
        ]
    )
    torch.testing.assert_close(sampled, expected)
    # zero padding outside [0, L - 1]: half-way to a missing neighbour keeps half the edge slice
    outside = interpolate_slices(values[:1], torch.tensor([[-0.5, 4.5, -1.0, 5.0, -7.3, 12.0]]))[0]
    torch.testing.assert_close(outside[0], 0.5 * values[0, 0])
    torch.testing.assert_close(outside[1], 0.5 * values[0, 4])
    assert torch.count_nonzero(outside[2:]) == 0


def test_interpolation_gradient_wrt_position_is_neighbour_difference():
    torch.manual_seed(2)
    values = torch.randn(1, 6, 4)
    positions = torch.tensor([[1.3, 3.7]], requires_grad=True)
    sampled = interpolate_slices(values, positions)
    sampled.sum().backward()
    expected = torch.stack([(values[0, 2] - values[0, 1]).sum(), (values[0, 4] - values[0, 3]).sum()])
    torch.testing.assert_close(positions.grad[0], expected)


def test_table_interpolation_exact_and_linear_and_clamped():
    table = torch.tensor([[0.0, 10.0, 30.0], [1.0, 2.0, 4.0]])
    index = torch.tensor([[[0.0, 1.0, 1.5, 2.0, -3.0, 9.0]], [[0.5, 2.0, 1.25, 1.0, -1.0, 5.0]]]).transpose(0, 1)
    out = interpolate_table(table, index)  # (B=1, H=2, 6)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 10.0, 20.0, 30.0, 0.0, 30.0]))
    torch.testing.assert_close(out[0, 1], torch.tensor([1.5, 4.0, 2.5, 2.0, 1.0, 4.0]))


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("length", [9, 6])
def test_zero_offsets_r1_equals_multihead_attention_over_all_slices(length):
    attention = zero_offsets(small_attention()).eval()
    torch.manual_seed(3)
    x = torch.randn(2, length, 20)
    out, positions = attention(x, return_positions=True)
    # r = 1 and zero offsets: every group samples exactly the slices 0..F-1
    assert torch.equal(positions, torch.arange(length, dtype=torch.float32).expand(2, 3, length))
    torch.testing.assert_close(out, reference_attention(attention, x), rtol=1e-5, atol=1e-6)


def test_reference_check_is_sensitive_to_offsets_and_bias():
    """The equivalence above is not vacuous: random offsets or a different bias break it."""
    torch.manual_seed(4)
    x = torch.randn(2, 9, 20)
    attention = small_attention().eval()  # default (random) offset network
    assert not torch.allclose(attention(x), reference_attention(attention, x), atol=1e-4)
    attention = zero_offsets(small_attention()).eval()
    expected = reference_attention(attention, x)
    with torch.no_grad():
        attention.position_bias.mul_(50.0)
    assert not torch.allclose(attention(x), expected, atol=1e-4)


def test_heads_share_their_group_points_and_bias_is_interpolated_at_fractional_displacement():
    """Each group g gets its own fractional shift; the 2 heads of group g must read keys / values interpolated at
    j + shift_g (0.7 / 0.3 mixes of neighbours, zero beyond the volume) with the bias table interpolated at
    i - (j + shift_g). Compared with attention over explicitly mixed slices, written without the module's helpers."""
    attention = zero_offsets(small_attention()).eval()  # 6 heads, 3 groups, r = 1, F = 9
    shifts = torch.tensor([0.3, -0.6, 1.25])
    original = attention.sampling_positions
    attention.sampling_positions = lambda q: original(q) + shifts.view(1, 3, 1)
    torch.manual_seed(5)
    x = torch.randn(1, 9, 20)
    out, positions = attention(x, return_positions=True)
    heads, dim, length = attention.num_heads, attention.head_dim, 9
    padded = torch.cat([torch.zeros(1, 2, 20), x, torch.zeros(1, 3, 20)], dim=1)  # slice s at index s + 2
    q = attention.query(x).reshape(1, length, heads, dim).transpose(1, 2)
    i = torch.arange(length).view(-1, 1).float()
    head_outputs = []
    for head in range(heads):
        group = head // 2  # heads (0, 1) -> group 0, (2, 3) -> 1, (4, 5) -> 2
        shift = float(shifts[group])
        assert torch.allclose(positions[0, group], torch.arange(9.0) + shift)
        low = math.floor(shift)
        frac = shift - low
        mixed = (1 - frac) * padded[:, 2 + low : 2 + low + length] + frac * padded[:, 3 + low : 3 + low + length]
        channels = slice(head * dim, (head + 1) * dim)
        k = mixed @ attention.key.weight[channels].T + attention.key.bias[channels]
        v = mixed @ attention.value.weight[channels].T + attention.value.bias[channels]
        j = torch.arange(length).view(1, -1).float()
        index = (i - (j + shift) + length - 1).clamp(0, 2 * length - 2)
        lo = index.floor().long()
        table = attention.position_bias[head]
        bias = table[lo] * (1 - (index - lo)) + table[(lo + 1).clamp(max=2 * length - 2)] * (index - lo)
        weights = torch.softmax(q[0, head] @ k[0].T / math.sqrt(dim) + bias, dim=-1)
        head_outputs.append(weights @ v[0])
    expected = attention.output(torch.cat(head_outputs, dim=-1)).unsqueeze(0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_output_does_not_depend_on_slices_outside_the_sampled_points():
    # r = 4, 12 slices, zero offsets: reference points 1.5, 5.5, 9.5 read slices {1, 2, 5, 6, 9, 10} only
    attention = zero_offsets(small_attention(downsample=4, num_slices=12)).eval()
    torch.manual_seed(6)
    x = torch.randn(1, 12, 20)
    out, positions = attention(x, return_positions=True)
    assert torch.equal(positions[0, 0], torch.tensor([1.5, 5.5, 9.5]))
    for unsampled in (0, 3, 4, 7, 8, 11):
        changed = x.clone()
        changed[0, unsampled] += 5.0 * torch.randn(20)
        new = attention(changed)
        others = [i for i in range(12) if i != unsampled]
        torch.testing.assert_close(new[0, others], out[0, others], rtol=0, atol=1e-6)
        assert not torch.allclose(new[0, unsampled], out[0, unsampled])  # its own query did change
    changed = x.clone()
    changed[0, 5] += 5.0  # a sampled slice changes every output
    assert not torch.allclose(attention(changed)[0, 0], out[0, 0])


def test_positions_stay_within_offset_range_and_count_is_f_over_r():
    attention = small_attention(downsample=4, num_slices=64, offset_scale=2.0)
    torch.manual_seed(7)
    _, positions = attention(torch.randn(2, 64, 20), return_positions=True)
    assert positions.shape == (2, 3, 16)
    reference = attention.reference_points(64)
    assert torch.equal(reference, torch.arange(16) * 4 + 1.5)
    assert (positions - reference).abs().max() <= 2.0 * 4
    assert (positions - reference).abs().max() > 0  # random init moves the points
    _, positions = attention(torch.randn(1, 10, 20), return_positions=True)  # F not divisible by r
    assert positions.shape == (1, 3, 3)
    assert torch.equal(attention.reference_points(10), torch.tensor([1.5, 5.5, 8.5]))


def test_gradients_reach_the_offset_network():
    attention = small_attention(downsample=2, num_slices=16)
    torch.manual_seed(8)
    x = torch.randn(2, 16, 20)
    out, positions = attention(x, return_positions=True)
    assert positions.requires_grad
    out.square().sum().backward()
    for parameter in (attention.offset_conv.weight, attention.offset_conv.bias, attention.offset_out.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0
    assert attention.position_bias.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    attention = small_attention()
    with pytest.raises(ValueError, match=r"slice embeddings \(B, F, D=20\)"):
        attention(torch.randn(4, 20))
    with pytest.raises(ValueError, match="2D image has no slice axis"):
        attention(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="has 16 channels, expected 20"):
        attention(torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match="multiple of offset_groups"):
        DeformableSliceAttention(num_heads=6, offset_groups=4)


def test_full_size_attention_and_mixed_precision():
    torch.manual_seed(9)
    attention = DeformableSliceAttention()  # D = 640, F = 64, 6 heads x 64, 6 groups, r = 4
    assert attention.inner_dim == 384 and attention.group_channels == 64
    x = torch.randn(1, 64, 640)
    assert attention(x).shape == (1, 64, 640)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, positions = attention(x, return_positions=True)
    assert out.dtype == torch.bfloat16 and positions.dtype == torch.float32 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- transformer (f_inter)


def small_transformer(**kwargs) -> DeformableSliceTransformer:
    torch.manual_seed(10)
    options = dict(embed_dim=24, num_slices=12, num_layers=2, num_heads=6, head_dim=4, offset_groups=6, ffn_dim=30)
    options.update(kwargs)
    return DeformableSliceTransformer(**options)


def test_transformer_shapes_dropout_and_volume_embedding():
    transformer = small_transformer()
    x = torch.randn(3, 12, 24)
    transformer.eval()
    out = transformer(x)
    assert out.shape == (3, 12, 24)
    assert torch.equal(out, transformer(x))  # eval: deterministic
    transformer.train()
    assert not torch.allclose(transformer(x), out)  # dropout 0.1 active in training
    z = volume_embedding(out)
    assert z.shape == (3, 24)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(z, torch.nn.functional.normalize(out.mean(1), dim=1))
    assert len(transformer.layers) == 2


def test_positional_encoding_makes_slice_order_matter():
    x = torch.randn(1, 12, 24)
    flipped = x.flip(1)
    none = small_transformer(positional_encoding="none", downsample=1).eval()
    zero_bias = [layer.attention.position_bias for layer in none.layers]
    with torch.no_grad():
        for table in zero_bias:
            table.zero_()
        for layer in none.layers:
            layer.attention.offset_out.weight.zero_()
    # no positions, no bias, r = 1, zero offsets: plain attention is permutation-equivariant
    torch.testing.assert_close(none(flipped), none(x).flip(1), rtol=1e-5, atol=1e-5)
    sinusoidal = small_transformer(downsample=1).eval()
    with torch.no_grad():
        for layer in sinusoidal.layers:
            layer.attention.position_bias.zero_()
            layer.attention.offset_out.weight.zero_()
    assert not torch.allclose(sinusoidal(flipped), sinusoidal(x).flip(1), atol=1e-4)
    encoding = sinusoidal_positions(12, 24)
    assert encoding.shape == (12, 24) and torch.equal(encoding[0, 1::2], torch.ones(12))


def test_learned_positions_and_errors():
    transformer = small_transformer(positional_encoding="learned")
    assert transformer.position_embedding.shape == (12, 24)
    assert transformer(torch.randn(1, 8, 24)).shape == (1, 8, 24)
    with pytest.raises(ValueError, match="13 slices but the learned positional encoding has 12"):
        transformer(torch.randn(1, 13, 24))
    with pytest.raises(ValueError, match="positional_encoding='rope'"):
        small_transformer(positional_encoding="rope")
    with pytest.raises(ValueError, match="slice embeddings"):
        transformer(torch.randn(2, 24))


def test_default_f_inter_size():
    transformer = DeformableSliceTransformer()  # 4 layers, D = 640, F = 64
    assert len(transformer.layers) == 4
    layer = transformer.layers[0]
    assert layer.ffn[0].out_features == 720 and layer.ffn[3].in_features == 720
    assert layer.attention.num_heads == 6 and layer.attention.offset_groups == 6
    assert sum(p.numel() for p in transformer.parameters()) == 4 * sum(p.numel() for p in layer.parameters())
