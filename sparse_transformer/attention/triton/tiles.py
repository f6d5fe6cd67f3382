"""Tile choice of the Triton kernels: a pure function over frozen tables, with a per-call override.

``tile_config(role, head_dim, dtype)`` is the tile one launch of the backend uses: ``(BLOCK_M,
BLOCK_N, num_warps, num_stages)``, where ``BLOCK_M`` counts queries and ``BLOCK_N`` keys in every
kernel. It reads only its arguments and the tables below, which cannot be changed at run time. A
call that wants other tiles (a tuning sweep, a test that needs both tile walks) passes a
:class:`Tuning` to ``sparse_attention(..., backend="triton", tuning=...)``; it travels with that call
(forward and backward) and nowhere else.

Roles (``ROLES``), one per kind of launch (ops.py's plan names the role of each launch):

* ``fwd``, ``dq``, ``dkdv``: a natural-order pass of a Band or Block term;
* ``fwd_summary``, ``dq_summary``: a natural-order pass that holds a Summary term (with or without a
  Block); ``dkdv_summary``: the launch over the summary keys;
* ``fwd_stride``, ``dq_stride``, ``dkdv_stride``: a transposed pass (a Stride term on its residue runs);
* ``dkdv_owned``: a transposed pass whose residue classes are short enough for one program each,
  whose dK/dV launch adds dQ too (kernels.py, "owned"). Its ``BLOCK_N`` is the longest class it
  takes; the launch's key tile is the class length rounded up to a power of two, or, for classes
  longer than ``OWNED_STEP_KEYS``, that many keys, walked one key tile after another.
* ``dkdv_band``: a Band term's owned backward (kernels.py, "owned band"): dQ, dK and dV in two
  launches (even, then odd chunks of at least a window of keys) instead of a dQ pass and a dK/dV
  launch.

Head dim 64 (bf16): two tile sweeps on an H200 (2026-11-28; strided l=128 and fixed l=128 c=32 at
n=16K B=8, strided l=256 at 64K B=2, strided l=1024 at 1M; 8 heads), each launch timed on its own.
The short band and stride passes walk one masked loop (``SHORT_RUN_TILES``) and want narrow tiles
there (dQ 64x32, stride dK/dV 16x64, 32x64 since 2026-12-01 (below); the band dK/dV went from 0.63
to 0.43 ms at 16K against the first sweep's 32x128); the summary passes keep 64x64 (fwd, dQ: larger tiles were 2-50 % slower) and
dK/dV 32x64 (3.36 -> 2.99 ms). fwd+bwd, do_bench medians, against the one tile set per kernel used
before (owned stride backward in both): strided 16K 2.14 -> 1.73 ms, fixed 16K 6.85 -> 6.49,
strided 64K 2.71 -> 2.38, strided 1M 45.8 -> 46.6 (one or two calls per median at 1M: within its
spread). Head dims 16 and 32 use the 64 tiles; 128 (and above) keeps the larger-warp tiles that
passed the GPU tests. ``sparse-transformer bench tiles`` repeats the sweep.

The band/block dK/dV tile went from 64x64 to 32x64 (queries x keys) on 2026-12-01: the 2026-11-30
sweep's per-launch times had it ahead in every case (that sweep's set of winners was not adopted,
slowed by another role's winner), and an A/B in one call confirmed it alone (fwd+bwd, committed
twice against 32x64: strided 16K 1.724/1.712 -> 1.664 ms, fixed 16K 6.333/6.500 -> 6.297, strided 1M
47.07/47.29 -> 45.56; its launch 0.43 -> 0.37 ms at 16K and 14.9-15.1 -> 13.3 ms at 1M; 3 and 2
stages, 8 warps, 16 and 32 keys were slower).

The band, block and summary dK/dV tiles cap ptxas at 168 registers per thread (``max_registers``)
since 2026-12-01: their split walk became one loop (kernels.py, ``ONE_LOOP``: three loops had ptxas
serialize every wgmma), which took the band launch to 172 registers, two programs of 128 threads per
multiprocessor instead of three. At 168 ptxas spills nothing and three fit (ops._one_loop has the
timings). The summary forward went from 64x64 (4 warps) to 128x64 (8 warps) the same day, once its
grid ran longest first (ops._grid_order): fixed l=128 c=32 16K launch 1.53 -> 1.47 ms and 1.46 ->
1.42 in two calls (fwd+bwd 6.25 -> 6.04 ms), 64K unchanged (2.90 / 2.89 ms).

The stride dK/dV tile went from 16x64 to the band's 32x64 with the 168-register cap on 2026-12-01
(H200, one call against the 16x64 tile: strided l=1024 1M launch 9.24/9.30 -> 8.39 ms, strided l=256
64K 0.505/0.531 -> 0.489/0.490; 32x128 was slower at both, 9.47 and 0.595). It keeps its three-loop
walk (``ops._one_loop``): in one loop the same tile took 10.08 ms at 1M.

The band/block forward tile caps ptxas at 128 registers since 2026-12-01: at its natural 135, three
programs of 128 threads fit a multiprocessor; at 128 four do (its 56 KiB of shared memory allows
four), with a few bytes of spills outside the loop. H200, one call, two rounds against no cap: strided
l=1024 1M launch 7.35/7.30 -> 6.83/7.05 ms, l=256 64K 0.374/0.387 -> 0.359/0.369, l=128 16K
0.252/0.252 -> 0.244/0.249. The stride forward (128 registers already) gained nothing from the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

__all__ = [
    "FP32_TILES",
    "INTERPRETER_TILE",
    "OWNED_BAND_TILES",
    "OWNED_STEP_KEYS",
    "ROLES",
    "SHORT_RUN_TILES",
    "TILES",
    "Tile",
    "Tuning",
    "owned_band",
    "owned_step_keys",
    "padded_dim",
    "short_run_tiles",
    "tile_config",
]


@dataclass(frozen=True)
class Tile:
    """The tile of one launch: ``block_m`` queries by ``block_n`` keys, and Triton's launch options
    (``max_registers`` is its ``maxnreg``, the registers per thread ptxas may use; None or 0: its
    own choice)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
                raise ValueError(f"Tile.{name} must be a power of two >= 16 (tl.dot's smallest side), got {value!r}")
        if not (
            isinstance(self.num_warps, int) and 1 <= self.num_warps <= 32 and self.num_warps & (self.num_warps - 1) == 0
        ):
            raise ValueError(f"Tile.num_warps must be a power of two from 1 to 32, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"Tile.num_stages must be a positive integer, got {self.num_stages!r}")
        r = self.max_registers
        if r == 0:
            object.__setattr__(self, "max_registers", None)
        elif r is not None and not (isinstance(r, int) and not isinstance(r, bool) and 24 <= r <= 255):
            raise ValueError(f"Tile.max_registers must be None or an integer from 24 to 255, got {r!r}")

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """``(block_m, block_n, num_warps, num_stages, max_registers or 0)``."""
        return (self.block_m, self.block_n, self.num_warps, self.num_stages, self.max_registers or 0)


ROLES = (
    "fwd",
    "fwd_summary",
    "fwd_stride",
    "dq",
    "dq_summary",
    "dq_stride",
    "dkdv",
    "dkdv_summary",
    "dkdv_stride",
    "dkdv_owned",
    "dkdv_band",
)


def _by_dim(d64: tuple[int, ...], d128: tuple[int, ...]) -> Mapping[int, Tile]:
    """Tiles by padded head dim: a head dim takes the entry of the largest key not above it (16 and
    32 take 64's)."""
    return MappingProxyType({64: Tile(*d64), 128: Tile(*d128)})


_D128_FWD, _D128_DQ, _D128_DKDV = (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2)

# fp16 and bf16, by role and padded head dim
TILES: Mapping[str, Mapping[int, Tile]] = MappingProxyType(
    {
        "fwd": _by_dim((64, 64, 4, 3, 128), _D128_FWD),
        "fwd_summary": _by_dim((128, 64, 8, 3), _D128_FWD),
        "fwd_stride": _by_dim((64, 64, 4, 3), _D128_FWD),
        "dq": _by_dim((64, 32, 4, 3), _D128_DQ),
        "dq_summary": _by_dim((64, 64, 4, 3), _D128_DQ),
        "dq_stride": _by_dim((64, 32, 4, 3), _D128_DQ),
        "dkdv": _by_dim((32, 64, 4, 3, 168), _D128_DKDV),
        "dkdv_stride": _by_dim((32, 64, 4, 3, 168), _D128_DKDV),
        "dkdv_summary": _by_dim((32, 64, 4, 3, 168), _D128_DKDV),
        # the dQ tile [BLOCK_M, d] fp32 joins the dK/dV accumulators: d 128 takes classes up to 64 keys
        "dkdv_owned": _by_dim((32, 128, 4, 2, 168), (32, 64, 8, 2)),
        "dkdv_band": _by_dim((64, 64, 4, 3), _D128_DKDV),
    }
)
# fp32 tiles are twice the bytes: halve them and pipeline two deep so K/V stages fit shared memory.
# One entry per kernel (a role without its own entry takes its kernel's: "dq_stride" -> "dq").
FP32_TILES: Mapping[str, Tile] = MappingProxyType(
    {
        "fwd": Tile(64, 32, 4, 2),
        "dq": Tile(64, 32, 4, 2),
        "dkdv": Tile(32, 64, 4, 2),
        "dkdv_owned": Tile(32, 64, 4, 2),
    }
)
# The CPU interpreter's cost is per program and per op: mid-size tiles keep tests quick while still
# giving several tiles (and every masked/unmasked run) at test sizes. Its owned classes are at most
# 32 long, so test lengths reach both the owned and the two-pass schedule of the stride term.
INTERPRETER_TILE = Tile(32, 32, 1, 1)

# A range term whose rows read at most this many tiles runs as one masked loop (kernels._segments).
# H200 (tile sweep, tiles as TILES): strided l=128 16K fwd+bwd 2.06 ms always split, 1.74 at 4,
# 1.73 at 8; strided l=256 64K 2.53 / 2.53 / 2.38; fixed and strided 1M within 1-3 %.
SHORT_RUN_TILES = 8

# A Band term's backward runs owned (``dkdv_band``: one walk of each key tile's queries gives dK, dV
# and its dQ share, 5 tile matmuls per pair instead of 7) where that measured faster: a window of at
# most this many ``dkdv_band`` key tiles, in a head group that runs a dQ pass anyway (which writes
# delta; without one, delta costs a launch of its own), for 16-bit inputs and head dims up to 64 (where
# it was measured; elsewhere ``Tuning(owned_band=True)`` forces it). Its dQ read-add-write per (key tile, query
# tile) pair moves as many bytes as the dQ pass's K and V loads it saves, and serializes the
# program's key tiles, so a long window loses. H200, bf16, d 64, 8 heads, fwd+bwd (do_bench medians,
# two calls): strided l=256 64K 2.47/2.42 -> 2.35/2.34 ms (window of 4 tiles, the stride term has a
# dQ pass); strided l=128 16K 1.72 -> 1.80/1.79 (every pass owned: +0.07 ms delta launch); strided
# l=1024 1M 46.5/47.4 -> 49.6/49.6 (window of 16 tiles). Other tiles than (64, 64, 4, 3): slower.
OWNED_BAND_TILES = 4

# An owned transposed pass (``dkdv_owned``) whose classes are longer than this many keys walks each
# class in key tiles of this many, one after another in its program (kernels.py, "owned"), instead
# of holding the whole class in one key tile: two 64-key dK/dV accumulators instead of one of 128,
# which spilled at 255 registers. H200, bf16, d 64, strided l=128 16K (classes of 128), owned launch
# 0.585/0.588 ms (one 128-key tile, 3 stages) -> 0.536/0.538 (two of 64, 2 stages, 168 registers),
# 0.514/0.513 with the transposed dQ product (kernels._owned_dq); fwd+bwd 1.680 -> 1.613 ms.
OWNED_STEP_KEYS = 64


def _frozen_tiles(tiles: Mapping[str, Tile | tuple[int, int, int, int]]) -> Mapping[str, Tile]:
    out = {}
    for role, tile in dict(tiles).items():
        if role not in ROLES:
            raise ValueError(f"Tuning: unknown tile role {role!r}; roles are {', '.join(ROLES)}")
        out[role] = tile if isinstance(tile, Tile) else Tile(*tile)
    return MappingProxyType(out)


@dataclass(frozen=True)
class Tuning:
    """A per-call override of the tile choice, for tuning and tests (``None`` everywhere: the tables).

    Args:
        tiles: ``{role: Tile or (BLOCK_M, BLOCK_N, num_warps, num_stages[, max_registers])}``; a role given here
            takes this tile at every head dim and dtype, under the interpreter too.
        short_run_tiles: a range term whose rows read at most this many key tiles walks them as one
            masked loop, else as masked head, unmasked middle and masked tail (0: always split).
        owned_band: ``True``: every bounded Band term's backward runs owned (``dkdv_band``: dQ, dK,
            dV in two launches); ``False``: none does (a dQ pass plus a dK/dV launch); ``None``: where
            ``OWNED_BAND_TILES`` says it is faster.
        owned_step_keys: an owned transposed pass walks a class longer than this many keys in key
            tiles of this many (a power of two >= 16), else ``OWNED_STEP_KEYS``.

    Passed as ``sparse_attention(..., backend="triton", tuning=Tuning(...))``; it reaches the
    custom op as ints (:meth:`encode`), so the backward of that call uses it too.
    """

    tiles: Mapping[str, Tile] = field(default_factory=lambda: MappingProxyType({}))
    short_run_tiles: int | None = None
    owned_band: bool | None = None
    owned_step_keys: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "tiles", _frozen_tiles(self.tiles))
        s = self.short_run_tiles
        if s is not None and not (isinstance(s, int) and not isinstance(s, bool) and s >= 0):
            raise ValueError(f"Tuning.short_run_tiles must be a non-negative integer or None, got {s!r}")
        if self.owned_band is not None and not isinstance(self.owned_band, bool):
            raise ValueError(f"Tuning.owned_band must be True, False or None, got {self.owned_band!r}")
        k = self.owned_step_keys
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 16 and k & (k - 1) == 0):
            raise ValueError(f"Tuning.owned_step_keys must be a power of two >= 16 or None, got {k!r}")

    def __hash__(self):
        return hash(tuple(self.encode()))

    def encode(self) -> list[int]:
        """As ints for the custom op: ``[short_run_tiles or -1, owned_band (-1: None, 0, 1),
        owned_step_keys or -1, (role index, *tile.as_tuple()) per role]``."""
        ints = [
            -1 if self.short_run_tiles is None else self.short_run_tiles,
            -1 if self.owned_band is None else int(self.owned_band),
            -1 if self.owned_step_keys is None else self.owned_step_keys,
        ]
        for i, role in enumerate(ROLES):  # in ROLES order: equal tunings encode (and hash) alike
            if role in self.tiles:
                ints += [i, *self.tiles[role].as_tuple()]
        return ints

    @staticmethod
    def decode(ints: list[int] | tuple[int, ...]) -> Tuning | None:
        """The inverse of :meth:`encode` (``None`` for an empty list: no override). Raises
        ValueError for a list of another length (e.g. an older version's, with two header ints)."""
        if not ints:
            return None
        if len(ints) < 3 or (len(ints) - 3) % 6:
            raise ValueError(
                f"Tuning.decode: {len(ints)} ints is no Tuning.encode() list (3 header ints, then 6 per tile role)"
            )
        tiles = {ROLES[ints[i]]: Tile(*ints[i + 1 : i + 6]) for i in range(3, len(ints), 6)}
        return Tuning(
            tiles,
            None if ints[0] < 0 else ints[0],
            None if ints[1] < 0 else bool(ints[1]),
            None if ints[2] < 0 else ints[2],
        )


def padded_dim(d: int) -> int:
    """A head dim as the kernels pad it (``DK_PAD``, ``DV_PAD``): the next power of two, at least 16."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


def tile_config(
    role: str, head_dim: int, dtype: torch.dtype, *, interpreter: bool = False, tuning: Tuning | None = None
) -> Tile:
    """The tile of a launch of ``role`` (``ROLES``) at ``head_dim`` (the larger of dk and dv) and
    ``dtype`` of q, k, v: ``tuning``'s tile for the role when it has one, else ``INTERPRETER_TILE``
    when the kernels run on Triton's CPU interpreter, else the fp32 table for float32 inputs and
    ``TILES`` for fp16/bf16 (by padded head dim). Raises ValueError for an unknown role."""
    if role not in ROLES:
        raise ValueError(f"unknown tile role {role!r}; roles are {', '.join(ROLES)}")
    if tuning is not None and role in tuning.tiles:
        return tuning.tiles[role]
    if interpreter:
        return INTERPRETER_TILE
    if dtype == torch.float32:
        return FP32_TILES[role] if role in FP32_TILES else FP32_TILES[role.split("_")[0]]
    table = TILES[role]
    d = padded_dim(head_dim)
    fits = [k for k in table if k <= d]
    return table[max(fits) if fits else min(table)]


def short_run_tiles(tuning: Tuning | None = None) -> int:
    """The one-masked-loop threshold: ``tuning``'s when it sets one, else ``SHORT_RUN_TILES``."""
    return SHORT_RUN_TILES if tuning is None or tuning.short_run_tiles is None else tuning.short_run_tiles


def owned_step_keys(tuning: Tuning | None = None) -> int:
    """The owned launch's key tile for long classes: ``tuning``'s when it sets one, else ``OWNED_STEP_KEYS``."""
    return OWNED_STEP_KEYS if tuning is None or tuning.owned_step_keys is None else tuning.owned_step_keys


def owned_band(tuning: Tuning | None = None) -> bool | None:
    """``tuning``'s choice of the owned band backward (True, False), or None: the plan's rule
    (``OWNED_BAND_TILES``)."""
    return None if tuning is None else tuning.owned_band
