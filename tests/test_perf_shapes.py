"""CPU checks of what benchmark.perf measures: the layer shapes it times and the bytes it divides by,
and the shape rule that sends a scan to the Triton kernel or to the stock one."""
import math

import pytest
import torch

from benchmark.perf import SIZES, distinct_shapes, layer_shapes, mixer_bytes, scan_bytes
from methods.pixel_mamba.layers import TABLES
from methods.ssm.backends_gpu import MAX_STATE, MIN_LENGTH, STOCK_WINS_FROM_ROWS, triton_supports
from methods.ssm.scan import ScanInfo


def test_layer_shapes_follow_the_table_and_region_fusion():
    pixels = SIZES["16M"]
    regions = pixels // 1024
    fused = math.ceil(0.8 * regions / 24)
    shapes = layer_shapes("6m", pixels)
    first, second = shapes[0], shapes[1]
    assert (first.layers, first.tokens, first.channels, first.d_model) == ("1", pixels, 6, 3)
    # layer 2 sees 1x2 tokens (512 per region) of the regions left after one fusion step
    assert (second.layers, second.tokens, second.channels) == ("2", (regions - fused) * 512, 12)
    # one entry per distinct (token, width) row group, covering all 24 layers
    assert shapes[-1].layers == "23-24" and shapes[-1].channels == 2 * TABLES["6m"][-1].channels
    assert len({(s.tokens, s.channels) for s in shapes}) == len(shapes)


def test_distinct_shapes_merge_models_without_duplicates():
    shapes = distinct_shapes(["6m", "21m"], ["4M"])
    keys = [(s.tokens, s.channels) for s in shapes]
    assert len(keys) == len(set(keys))
    assert {s.model for s in shapes if s.channels == 1536} == {"21m"}  # only the 21M's last layers


def test_scan_bytes_counts_each_tensor_once():
    E, L, N = 6, 1000, 16
    forward = (3 * E + 2 * N + E) * 2 * L             # u, delta, z, B, C in; y out; bf16
    backward = (4 * E + 2 * N + 3 * E + 2 * N) * 2 * L  # + dy in; du, ddelta, dz, dB, dC out
    assert scan_bytes(E, L, 2, backward=False) == forward
    assert scan_bytes(E, L, 2, backward=True) == forward + backward


def _info(device="cuda", batch=1, channels=6, state=16, length=2**24, dtype=torch.bfloat16):
    return ScanInfo(batch, channels, state, length, torch.device(device), dtype, True, False)


@pytest.mark.parametrize("change,expected", [
    ({}, True),
    ({"device": "cpu"}, False),
    ({"channels": STOCK_WINS_FROM_ROWS}, False),
    ({"batch": 2, "channels": STOCK_WINS_FROM_ROWS // 2}, False),
    ({"length": MIN_LENGTH - 1}, False),
    ({"state": MAX_STATE + 1}, False),
    ({"dtype": torch.float64}, False),
    ({"channels": 1536, "length": 4350}, True),
])
def test_triton_backend_takes_long_narrow_scans_only(change, expected):
    assert triton_supports(_info(**change)) is expected


def test_mixer_bytes_counts_each_stage_once():
    d, E, R, N, L = 3, 6, 1, 16, 1000
    stages = [(3, 12),                                          # in_proj
              *[(6, 6), (6, 33), (1, 6), (50, 6)] * 2,           # conv, x_proj, dt_proj, scan; 2 branches
              (6, 3)]                                            # out_proj
    forward = sum(i + o for i, o in stages)
    backward = sum(2 * i + o for i, o in stages)
    assert mixer_bytes(d, E, R, L, 2) == (forward + backward) * L * 2
    # the scan stage alone is what scan_bytes counts
    assert (3 * 50 + 2 * 6) * L * 2 == scan_bytes(E, L, 2, backward=True)
