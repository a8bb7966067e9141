"""The two layer tables of Pixel-Mamba (paper supplement, shared PIXEL_MAMBA.md section 2), as data.

Every layer runs Mamba, then region fusion (RF), then its token expansion (TE), if it has one.
`token` is the receptive field (rows x cols of input pixels) of one token *entering* the layer and
`channels` its width; the table is checked for consistency when it is built (each TE doubles one side of
the token, Cat doubles the channels, Avg keeps them), so a typo in the data fails at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["h", "v"]  # h: merge (i, 2j) with (i, 2j+1); v: merge (2i, j) with (2i+1, j)
Mode = Literal["cat", "avg"]


@dataclass(frozen=True)
class TokenExpansion:
    direction: Direction
    mode: Mode

    def __str__(self) -> str:
        return f"{self.direction.upper()}-TE-{self.mode.capitalize()}"


@dataclass(frozen=True)
class LayerSpec:
    id: int
    token: tuple[int, int]  # receptive field (rows, cols) of a token entering the layer
    channels: int
    te: TokenExpansion | None = None

    @property
    def ops(self) -> str:
        return "Mamba+RF" + (f"+{self.te}" if self.te else "")


H_CAT, V_CAT = TokenExpansion("h", "cat"), TokenExpansion("v", "cat")
H_AVG, V_AVG = TokenExpansion("h", "avg"), TokenExpansion("v", "avg")

# (first id, last id, token, channels 6M, channels 21M, TE 6M, TE 21M): the supplement's rows verbatim.
_ROWS = (
    (1, 1, (1, 1), 3, 3, H_CAT, H_CAT),
    (2, 2, (1, 2), 6, 6, V_CAT, V_CAT),
    (3, 3, (2, 2), 12, 12, H_CAT, H_CAT),
    (4, 4, (2, 4), 24, 24, V_CAT, V_CAT),
    (5, 5, (4, 4), 48, 48, None, None),
    (6, 6, (4, 4), 48, 48, H_CAT, H_CAT),
    (7, 7, (4, 8), 96, 96, None, None),
    (8, 8, (4, 8), 96, 96, V_CAT, V_CAT),
    (9, 10, (8, 8), 192, 192, None, None),
    (11, 11, (8, 8), 192, 192, H_AVG, H_CAT),
    (12, 13, (8, 16), 192, 384, None, None),
    (14, 14, (8, 16), 192, 384, V_AVG, V_AVG),
    (15, 19, (16, 16), 192, 384, None, None),
    (20, 20, (16, 16), 192, 384, H_AVG, H_AVG),
    (21, 21, (16, 32), 192, 384, None, None),
    (22, 22, (16, 32), 192, 384, V_CAT, V_CAT),
    (23, 24, (32, 32), 384, 768, None, None),
)


def _table(column: int) -> tuple[LayerSpec, ...]:
    layers = []
    for first, last, token, *rest in _ROWS:
        channels, te = rest[column], rest[2 + column]
        # the TE of a multi-layer row (none in the tables) would act on its last layer only
        layers += [LayerSpec(i, token, channels, te if i == last else None) for i in range(first, last + 1)]
    return tuple(layers)


def output_shape(layer: LayerSpec) -> tuple[tuple[int, int], int]:
    """Token receptive field and channels leaving `layer` (after its TE)."""
    (rows, cols), channels = layer.token, layer.channels
    if layer.te is None:
        return (rows, cols), channels
    token = (rows, cols * 2) if layer.te.direction == "h" else (rows * 2, cols)
    return token, channels * 2 if layer.te.mode == "cat" else channels


def check_table(table: tuple[LayerSpec, ...], region_size: int = 32) -> None:
    """Raise ValueError unless the table starts at RGB pixels, consecutive layers agree, and the last
    token covers a whole region."""
    if (table[0].id, table[0].token, table[0].channels) != (1, (1, 1), 3):
        raise ValueError("layer table: layer 1 must take 1x1 RGB pixel tokens")
    for layer, nxt in zip(table, table[1:]):
        if output_shape(layer) != (nxt.token, nxt.channels) or nxt.id != layer.id + 1:
            raise ValueError(f"layer table: layer {layer.id} ({layer.ops}) does not lead to layer {nxt.id}")
    if output_shape(table[-1])[0] != (region_size, region_size):
        raise ValueError(f"layer table: the last token is not {region_size}x{region_size}")


TABLE_6M = _table(0)
TABLE_21M = _table(1)
TABLES = {"6m": TABLE_6M, "21m": TABLE_21M}
for _t in TABLES.values():
    check_table(_t)
