"""Pixel-Mamba's token operations against hand-computed cases: zigzag serialisation, token expansion,
region fusion, region cutting, and the layer tables."""

import numpy as np
import pytest
import torch

from methods.pixel_mamba.layers import H_AVG, H_CAT, TABLE_6M, TABLE_21M, V_AVG, V_CAT, output_shape
from methods.pixel_mamba.token_ops import (
    cut_regions,
    deserialize,
    fusion_schedule,
    region_fusion,
    serialize,
    token_expansion,
    zigzag_region_order,
)


# ---- layer tables -----------------------------------------------------------------------------------
def test_tables_have_24_layers_ending_in_one_token_per_region():
    for table, last_channels in ((TABLE_6M, 384), (TABLE_21M, 768)):
        assert [layer.id for layer in table] == list(range(1, 25))
        assert output_shape(table[-1]) == ((32, 32), last_channels)
        assert sum(layer.te is not None for layer in table) == 10  # 5 horizontal and 5 vertical halvings


def test_tables_differ_only_where_the_supplement_says():
    assert str(TABLE_6M[10].te) == "H-TE-Avg" and str(TABLE_21M[10].te) == "H-TE-Cat"
    assert [l.channels for l in TABLE_6M[11:22]] == [192] * 11
    assert [l.channels for l in TABLE_21M[11:22]] == [384] * 11
    assert TABLE_6M[0].ops == "Mamba+RF+H-TE-Cat" and TABLE_6M[4].ops == "Mamba+RF"


# ---- zigzag serialisation -----------------------------------------------------------------------
def test_region_order_on_a_2x3_grid_is_boustrophedon():
    grid = np.array([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])  # row-major, as the slide stage gives
    assert grid[zigzag_region_order(grid)].tolist() == [[0, 0], [0, 1], [0, 2], [1, 2], [1, 1], [1, 0]]


def test_region_order_skips_background_and_handles_any_input_order():
    regions = np.array([(2, 0), (1, 3), (0, 1), (1, 0), (2, 2)])  # (0, 0), (1, 1), ... are background
    assert regions[zigzag_region_order(regions)].tolist() == [[0, 1], [1, 3], [1, 0], [2, 0], [2, 2]]


def test_tokens_inside_each_region_are_serialised_zigzag():
    # 2 regions of 2x3 tokens, token value = 10 * region + 3 * row + col
    x = torch.tensor([[[0, 1, 2], [3, 4, 5]], [[10, 11, 12], [13, 14, 15]]], dtype=torch.float32)[..., None]
    seq = serialize(x)
    assert seq.shape == (1, 12, 1)
    assert seq.flatten().tolist() == [0, 1, 2, 5, 4, 3, 10, 11, 12, 15, 14, 13]
    assert torch.equal(deserialize(seq, x.shape), x)


def test_serialisation_round_trips_every_token_grid():
    for shape in ((3, 32, 32, 3), (2, 32, 16, 6), (4, 1, 2, 5), (2, 3, 1, 4), (1, 1, 1, 7)):
        x = torch.randn(shape)
        seq = serialize(x)
        assert seq.shape == (1, shape[0] * shape[1] * shape[2], shape[3])
        assert torch.equal(deserialize(seq, x.shape), x)


# ---- token expansion ----------------------------------------------------------------------------
def test_token_expansion_on_a_known_tensor():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)  # one region, 2x2 tokens, 1 channel
    assert token_expansion(x, H_CAT).tolist() == [[[[1.0, 2.0]], [[3.0, 4.0]]]]  # (1, 2, 1, 2)
    assert token_expansion(x, H_AVG).tolist() == [[[[1.5]], [[3.5]]]]
    assert token_expansion(x, V_CAT).tolist() == [[[[1.0, 3.0], [2.0, 4.0]]]]  # (1, 1, 2, 2)
    assert token_expansion(x, V_AVG).tolist() == [[[[2.0], [3.0]]]]


def test_token_expansion_matches_an_explicit_loop():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).view(2, 4, 6, 3)
    n, h, w, c = x.shape
    for te in (H_CAT, H_AVG, V_CAT, V_AVG):
        out = token_expansion(x, te)
        for r in range(n):
            for i in range(out.shape[1]):
                for j in range(out.shape[2]):
                    a, b = (x[r, i, 2 * j], x[r, i, 2 * j + 1]) if te.direction == "h" else (x[r, 2 * i, j], x[r, 2 * i + 1, j])
                    expected = torch.cat([a, b]) if te.mode == "cat" else (a + b) / 2
                    assert torch.equal(out[r, i, j], expected), (te, r, i, j)


def test_token_expansion_refuses_an_odd_grid():
    with pytest.raises(ValueError, match="even"):
        token_expansion(torch.zeros(1, 2, 3, 1), H_CAT)


# ---- region fusion -----------------------------------------------------------------------------
def _regions(*means):
    """Regions of 1x2 tokens whose two tokens are equal (so the mean token is the token)."""
    return torch.tensor([[m, m] for m in means], dtype=torch.float64).view(len(means), 1, 2, -1)


def test_fusion_schedule():
    assert fusion_schedule(1000, 0.8, 24) == [34] * 23 + [800 - 23 * 34]  # k = ceil(800 / 24) = 34
    assert fusion_schedule(100, 0.8, 24) == [4] * 20 + [0] * 4  # 80 of 100 fused
    assert fusion_schedule(10, 0.8, 24) == [1] * 8 + [0] * 16
    assert fusion_schedule(10, 1.0, 24) == [1] * 9 + [0] * 15  # down to one region
    assert fusion_schedule(1, 0.8, 24) == [0] * 24
    assert fusion_schedule(10, 0.0, 24) == [0] * 24
    with pytest.raises(ValueError, match="alpha"):
        fusion_schedule(10, 1.5, 24)


def test_fusion_merges_the_most_similar_neighbours_size_weighted():
    # cos(r0, r1) = 0.995 > cos(r2, r3) = 0.98 > cos(r1, r2) = 0.1
    x = _regions([1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0])
    sizes = torch.tensor([1.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    merged, new_sizes = region_fusion(x, sizes, 1)
    assert new_sizes.tolist() == [4.0, 1.0, 2.0]
    assert torch.allclose(merged[0, 0, 0], torch.tensor([1.0, 0.075], dtype=torch.float64))  # (1*r0 + 3*r1) / 4
    assert torch.equal(merged[1:], x[2:])

    merged, new_sizes = region_fusion(x, sizes, 2)
    assert new_sizes.tolist() == [4.0, 3.0]
    assert torch.allclose(merged[1, 0, 1], torch.tensor([0.4 / 3, 1.0], dtype=torch.float64))  # (r2 + 2*r3) / 3


def test_fusion_of_a_run_is_the_size_weighted_average_of_all_its_members():
    x = _regions([1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0])
    sizes = torch.tensor([1.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    merged, new_sizes = region_fusion(x, sizes, 5)  # more than n - 1: everything into one region
    assert new_sizes.tolist() == [7.0]
    expected = (x * sizes.view(-1, 1, 1, 1)).sum(0) / 7
    assert torch.allclose(merged[0], expected)


def test_fusion_over_24_layers_keeps_order_and_counts():
    torch.manual_seed(0)
    n = 50
    schedule = fusion_schedule(n, 0.8, 24)  # k = 2 per layer until 40 are fused
    position = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 2, 2, 1)
    x = torch.cat([position, torch.randn(n, 2, 2, 3, dtype=torch.float64)], dim=-1)
    sizes = torch.ones(n, dtype=torch.float64)
    for k in schedule:
        before = x.shape[0]
        x, sizes = region_fusion(x, sizes, k)
        assert x.shape[0] == before - k
        assert sizes.sum().item() == n
        positions = x[:, 0, 0, 0]  # size-weighted mean scan position of each merged run
        assert torch.all(positions[1:] > positions[:-1])
    assert x.shape[0] == 10
    # every input region counted once: sum(size * mean position) = sum of all positions
    assert (sizes * x[:, 0, 0, 0]).sum().item() == pytest.approx(n * (n - 1) / 2)


def test_fusion_with_one_region_does_nothing():
    x, sizes = torch.randn(1, 4, 4, 2), torch.ones(1)
    merged, new_sizes = region_fusion(x, sizes, 1)  # k is capped at n - 1 = 0
    assert merged is x and new_sizes is sizes


def test_fusion_passes_gradients_with_the_merge_weights():
    x = _regions([1.0, 0.0], [1.0, 0.1], [0.0, 1.0]).requires_grad_()
    merged, _ = region_fusion(x, torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64), 1)
    merged.sum().backward()
    assert x.grad[:, 0, 0, 0].tolist() == [0.25, 0.75, 1.0]


# ---- cutting regions ---------------------------------------------------------------------------------
def test_cut_regions_takes_each_grid_cell():
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    for row in range(2):
        for col in range(3):
            image[32 * row:32 * row + 32, 32 * col:32 * col + 32] = 10 * row + col
    pixels = cut_regions(image, np.array([(1, 2), (0, 1)]), 32)
    assert pixels.shape == (2, 32, 32, 3)
    assert (pixels[0] == 12).all() and (pixels[1] == 1).all()
    with pytest.raises(ValueError, match="whole number"):
        cut_regions(image[:50], np.array([(0, 0)]), 32)
