"""Launch plans for the Triton kernels, the torch custom ops that run them, and their autograd.

A pattern is not a tensor, so it reaches the custom op as a flat tuple of ints (:func:`encode`):
its head groups, each an arithmetic progression of heads sharing one term list. Each group runs as
a few *passes*, one kernel launch each (kernels.py explains the virtual sequences; docs/design.md §4 how
the plan reads them off the pattern's terms):

* one natural-order pass holding the group's Band or Block term and its Summary term, walked by one
  online softmax (fixed ``both`` is a single launch);
* one transposed-order pass per Stride term, which starts its online softmax from the previous
  pass's output and lse, so the two query orders of strided ``both`` merge exactly with no merge
  kernel.

The backward (kernels.py says what each kernel does) runs the dQ passes first (the first one also
writes delta = rowsum(dO·O)), then one dK/dV launch per term, each adding onto the previous one. No
atomics: it is bitwise reproducible. A transposed pass whose residue classes fit one key tile has no
dQ pass: its dK/dV launch adds dQ too (kernels.py, "owned"), since one program holds all the keys
its queries read. A short Band term in a group that runs a dQ pass anyway does the same in two
launches over even and odd chunks of keys (kernels.py, "owned band"; ``tiles.OWNED_BAND_TILES``).

:func:`forward_plan` and :func:`backward_plan` list every launch of a call (kernel, tile role, grid,
constexprs) as a pure function of the spec, the shapes, the dtype and an optional
:class:`~.tiles.Tuning`; the launchers only run them. Tiles come from :func:`~.tiles.tile_config`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton
from triton.runtime.jit import JITFunction

from ...patterns import Band, Block, Pattern, Stride, Summary, Term, ceil_div
from ..common import split_heads
from . import kernels
from .tiles import (
    OWNED_BAND_TILES,
    Tile,
    Tuning,
    owned_band,
    owned_step_keys,
    padded_dim,
    short_run_tiles,
    tile_config,
)

_BAND, _BLOCK, _STRIDE, _SUMMARY = 0, 1, 2, 3
# Whether the kernels run on Triton's CPU interpreter: TRITON_INTERPRET=1 was set when kernels.py was
# first imported (triton.jit reads it then), so they were built as interpreted functions, which take
# CPU tensors.
INTERPRET = not isinstance(kernels.attn_fwd, JITFunction)


# ---------------------------------------------------------------------------------------------
# Pattern -> plain ints -> launch plan
# ---------------------------------------------------------------------------------------------


def _progressions(heads: list[int]) -> list[tuple[int, int, int]]:
    """Split a sorted head list into arithmetic progressions ``(first, step, count)``."""
    out, i = [], 0
    while i < len(heads):
        if i + 1 == len(heads):
            out.append((heads[i], 1, 1))
            break
        step, j = heads[i + 1] - heads[i], i + 1
        while j + 1 < len(heads) and heads[j + 1] - heads[j] == step:
            j += 1
        out.append((heads[i], step, j - i + 1))
        i = j + 1
    return out


def _term_ints(t: Term) -> tuple[int, int, int, int, int]:
    """A term as ``(code, a, b, c, d)``, the inverse of :func:`_term_of`."""
    if isinstance(t, Band):
        return (_BAND, t.window or 0, 0, 0, 0)
    if isinstance(t, Block):
        return (_BLOCK, t.size, 0, 0, 0)
    if isinstance(t, Stride):
        return (_STRIDE, t.size, t.min_distance, 0, 0)
    if isinstance(t, Summary):
        return (_SUMMARY, t.size, t.lo, t.hi, int(t.earlier_blocks_only))
    raise ValueError(f"the triton backend does not know the pattern term {t!r}")


def _term_of(code: int, a: int, b: int, c: int, d: int) -> Term:
    """The term that :func:`_term_ints` encoded."""
    if code == _BAND:
        return Band(a or None)
    if code == _BLOCK:
        return Block(a)
    if code == _STRIDE:
        return Stride(a, b)
    if code == _SUMMARY:
        return Summary(a, b, c, bool(d))
    raise ValueError(f"unknown term code {code}")


def encode(pattern: Pattern, n_heads: int) -> list[int]:
    """The pattern's per-head structure as ints (a custom op takes no Python objects):
    ``[n_groups, (head0, head_step, count, n_terms, (code, a, b, c, d) * n_terms) * n_groups]``.
    An Interleaved pattern raises its ValueError (resolve it with ``.for_layer`` first); a term the
    kernels do not know raises ValueError."""
    spec = []
    n_groups = 0
    for terms, heads in pattern.head_groups(n_heads):
        ints = [x for t in terms for x in _term_ints(t)]
        for h0, step, count in _progressions(sorted(heads)):
            spec += [h0, step, count, len(terms), *ints]
            n_groups += 1
    return [n_groups, *spec]


@dataclass(frozen=True)
class _Pass:
    """One launch: at most one *range* term (a Band or Block walked in natural order, or a Stride
    term walked on its residue runs, the virtual sequence ``STEP = l``) and at most one summary
    term. The kernels' constexprs are read off the terms' own rules (docs/design.md §4)."""

    range_term: Band | Block | Stride | None = None
    summary: Summary | None = None

    @property
    def step(self) -> int:
        """1: natural order; ``l``: the residue runs of a Stride term."""
        return self.range_term.size if isinstance(self.range_term, Stride) else 1

    @property
    def has_range(self) -> bool:
        return self.range_term is not None

    @property
    def window(self) -> int:
        """A Band's window (0: unbounded or none)."""
        return (self.range_term.window or 0) if isinstance(self.range_term, Band) else 0

    @property
    def block(self) -> int:
        """A Block's size (0: none)."""
        return self.range_term.size if isinstance(self.range_term, Block) else 0

    @property
    def offset(self) -> int:
        """Rows between a query and its nearest key in a residue run: the Stride term's gap."""
        return self.range_term.gap if isinstance(self.range_term, Stride) else 0

    @property
    def sum_c(self) -> int:
        """Summary cells per block (0: no summary term)."""
        return self.summary.cells if self.summary else 0

    @property
    def sum_l(self) -> int:
        return self.summary.size if self.summary else 1

    @property
    def sum_lo(self) -> int:
        return self.summary.lo if self.summary else 0

    @property
    def sum_earlier(self) -> bool:
        return self.summary.earlier_blocks_only if self.summary else False

    @property
    def terms(self) -> tuple[Term, ...]:
        """The pattern terms this pass walks."""
        return tuple(t for t in (self.range_term, self.summary) if t is not None)

    def length(self, n: int) -> int:
        """Rows of the virtual sequence at length ``n``: ``n``, or the longest residue run."""
        return self.range_term.run_length(n) if self.step > 1 else n


@dataclass(frozen=True)
class _Group:
    head0: int
    head_step: int
    count: int
    passes: tuple[_Pass, ...]


def _plan_terms(terms: list[Term]) -> tuple[_Pass, ...]:
    """Natural-order passes first (one range term and one summary term share a launch), then one
    transposed pass per Stride term."""
    ranges, summaries, strides = [], [], []
    for t in terms:
        if isinstance(t, Stride):
            strides.append(_Pass(range_term=t))
        elif isinstance(t, Summary):
            summaries.append(t)
        else:
            ranges.append(t)
    passes = []
    while ranges or summaries:
        passes.append(_Pass(ranges.pop(0) if ranges else None, summaries.pop(0) if summaries else None))
    return tuple(passes + strides)


def decode(spec: list[int]) -> list[_Group]:
    """The launch plan of an :func:`encode` spec: head groups (heads ``head0 + i·head_step`` for
    ``i < count``), each with its passes (docs/design.md §4). Raises ValueError for an unknown
    term code."""
    groups, pos = [], 1
    for _ in range(spec[0]):
        h0, step, count, nt = spec[pos:pos + 4]
        pos += 4
        terms = [_term_of(*spec[pos + 5 * i: pos + 5 * i + 5]) for i in range(nt)]
        pos += 5 * nt
        groups.append(_Group(h0, step, count, _plan_terms(terms)))
    return groups


# ---------------------------------------------------------------------------------------------
# Launch plans: every launch of a forward or backward with its role and tile (pure, cached)
# ---------------------------------------------------------------------------------------------

_DELTA_ROWS = 64  # rows per program of the delta kernel


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: ``getattr(kernels, kernel)[grid](tensors..., n, H, *args, scales...,
    **meta)``. ``role`` is the tile role it was given (``tiles.ROLES``; ``"delta"`` for the delta kernel,
    which has no tile), ``args`` the head group's ``(head0, head_step, heads_in_group, tiles_per_class)``,
    ``meta`` the constexprs with ``num_warps`` and ``num_stages``, and ``terms`` the pattern terms
    whose (query, key) pairs it computes (none for the delta kernel; for work counts)."""

    kernel: str
    role: str
    grid: tuple[int, ...]
    args: tuple[int, ...]
    meta: Mapping[str, object]
    terms: tuple[Term, ...] = ()


@dataclass(frozen=True)
class BackwardPlan:
    """The backward's launches in order, and which outputs must start from zeros: dK and dV when a
    group of summary terms only leaves non-summary keys to no launch, dQ when a group whose every pass
    is owned has no dQ pass (every owned launch adds to dQ, and nothing writes the dQ rows a stride
    term's classes never read, the first ``offset`` rows of each class)."""

    launches: tuple[Launch, ...]
    zero_dkdv: bool
    zero_dq: bool


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 tensor-core products per dot (error near fp32's; plain tf32 costs
    # ~3e-4 relative). "ieee" lowers to FMA loops whose compile did not finish in minutes at d=128.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _pass_args(p: _Pass):
    return {"STEP": p.step, "WINDOW": p.window, "BLOCK": p.block, "OFFSET": p.offset, "SUM_C": p.sum_c,
            "SUM_L": p.sum_l, "SUM_LO": p.sum_lo, "SUM_EARLIER": p.sum_earlier}


def _meta(tile: Tile, block_n: int | None = None, **constexprs) -> Mapping[str, object]:
    registers = {"maxnreg": tile.max_registers} if tile.max_registers else {}
    return MappingProxyType({**constexprs, "BLOCK_M": tile.block_m, "BLOCK_N": block_n or tile.block_n,
                             "num_warps": tile.num_warps, "num_stages": tile.num_stages, **registers})


def _role(kernel: str, step: int, summary: bool) -> str:
    """The tile role of a launch of ``kernel`` ("fwd", "dq" or "dkdv") over a pass of virtual step
    ``step``: transposed (``step > 1``), holding a summary term (``summary``; for dK/dV: the summary
    keys' launch), or a natural-order range term. The owned dK/dV launch is "dkdv_owned"."""
    return kernel + ("_stride" if step > 1 else "_summary" if summary else "")


def _split(p: _Pass, n: int, block_m: int, block_n: int, short_run: int) -> bool:
    """Whether the range term of pass ``p`` walks its tiles as masked head, full middle, masked tail
    (long ranges) rather than one masked loop: the keys one query tile reads (or, in dK/dV, the
    queries one key tile meets, the same span; the term's ``key_span``) against ``short_run`` tiles
    (``tiles.short_run_tiles``). A pass without a range term reads as spanning ``n`` (its launch has
    no range walk)."""
    span = p.range_term.key_span(n, block_m) if p.range_term else n
    return span > short_run * block_n


def _query_grid(p: _Pass, n: int, block_m: int, bh: int):
    """The launch grid of a pass over tiles of ``block_m`` rows, and its tiles per residue run."""
    if p.step == 1:
        return (ceil_div(n, block_m), bh), 1
    per_class = ceil_div(p.length(n), block_m)
    return (p.step * per_class, bh), per_class


def _grid_order(p: _Pass, kernel: str, summary_keys: bool = False) -> int:
    """The grid order of a launch of ``kernel`` over pass ``p`` (``kernels._program_ids``): 0 reads
    the grid head by head; 1 and 2 tile-major with the longest programs first, so that a launch
    whose programs' work varies does not end on one long program. The forward of a pass that holds a
    summary term or an unbounded band (a later query tile reads more keys) takes 1; a dK/dV launch
    over summary, stride or unbounded-band keys (an earlier key tile is read by more queries) takes
    2 (``summary_keys``: the launch over the summary keys). Measured on an H200 (bf16, d 64, fwd+bwd
    launches, head-major against tile-major in one call): the fixed summary forward 2-6 % and
    dK/dV 6-10 % faster at 16K-64K (unchanged at 256K), the strided stride dK/dV at 1M 1-3 %; but
    the dQ passes up to 6 % slower (unchanged at 1M) and the short stride passes at 16K-64K slower
    (forward 9-11 %, dQ 4-5 %; presumably the head-major neighbours' shared keys in L2), so those
    stay head-major."""
    if kernel == "attn_fwd":
        varies = p.summary is not None or (isinstance(p.range_term, Band) and p.range_term.window is None)
        return 1 if varies else 0
    if kernel == "attn_bwd_dkdv":
        term = p.summary if summary_keys else p.range_term
        varies = isinstance(term, (Stride, Summary)) or (isinstance(term, Band) and term.window is None)
        return 2 if varies else 0
    return 0


def _one_loop(p: _Pass, summary_keys: bool) -> bool:
    """Whether a split dK/dV launch over pass ``p`` walks its query tiles as one loop with a uniform
    mask branch rather than three loops (``kernels.attn_bwd_dkdv``, ``ONE_LOOP``): every term but a
    stride term, whose three loops ptxas does not serialize. H200, bf16, d 64, launch times in one
    call: fixed l=128 c=32 16K summary dK/dV 2.92/2.87 -> 2.40/2.45 ms, fixed l=256 64K 6.30/6.45 ->
    5.32/5.47 and its block dK/dV 0.51-0.52 -> 0.35-0.37. One loop took the band launch from 164 to
    172 registers, two programs per multiprocessor instead of three (strided 1M 13.7-13.8 -> 15.5-15.7
    ms); capped at 168 (the tile's ``max_registers``: three programs of 128 threads in a
    multiprocessor's 65,536 registers, no spills) it is 3-5 % faster than three loops (1M 13.77/13.72
    -> 13.40/13.37 ms; relative to the dQ launch of the same call 1.90-1.92 -> 1.83 times it). A
    stride launch in one loop was 8 % slower (1M 9.5-9.7 -> 10.2-10.4 ms)."""
    return summary_keys or not isinstance(p.range_term, Stride)


def _owned_tile(p: _Pass, n: int, max_class: int) -> int:
    """The key tile that holds a whole residue class of transposed pass ``p``, or 0 when its classes
    are longer than ``max_class`` (the ``dkdv_owned`` tile's BLOCK_N; then the pass runs as a dQ pass
    plus a dK/dV launch)."""
    if p.step == 1:
        return 0
    length = p.length(n)
    return max(16, triton.next_power_of_2(length)) if length <= max_class else 0


def _band_chunk(p: _Pass, block_m: int, block_n: int) -> int:
    """Key tiles per program of the owned band backward of pass ``p`` (kernels.py, "owned band"),
    or 0 when the pass is not a lone bounded Band term in natural order. A chunk holds at least a
    window of keys and is a whole number of query and key tiles, so the query tiles that read one
    chunk never reach the chunk two ahead."""
    term = p.range_term
    if not isinstance(term, Band) or term.window is None or p.summary is not None:
        return 0
    tile = max(block_m, block_n)
    return ceil_div(max(term.window, tile), tile) * tile // block_n


def forward_plan(spec, B: int, H: int, n: int, dk: int, dv: int, dtype: torch.dtype,
                 tuning: Tuning | None = None) -> tuple[Launch, ...]:
    """The forward's launches (``attn_fwd``, one per pass of every head group) for an :func:`encode`
    spec, inputs ``[B, H, n, dk]`` / ``[B, H, n, dv]`` of ``dtype`` and an optional tile override."""
    return _forward_plan(tuple(spec), B, H, n, dk, dv, dtype, tuning)


@functools.lru_cache(maxsize=256)
def _forward_plan(spec, B, H, n, dk, dv, dtype, tuning):
    dkp, dvp = padded_dim(dk), padded_dim(dv)
    short_run = short_run_tiles(tuning)
    launches = []
    for g in decode(spec):
        for i, p in enumerate(g.passes):
            role = _role("fwd", p.step, p.sum_c > 0)
            t = tile_config(role, max(dkp, dvp), dtype, interpreter=INTERPRET, tuning=tuning)
            grid, per_class = _query_grid(p, n, t.block_m, B * g.count)
            meta = _meta(t, HAS_RANGE=p.has_range, INIT_FROM_OUT=i > 0, SPLIT=_split(p, n, t.block_m, t.block_n, short_run),
                         DK_PAD=dkp, DV_PAD=dvp, DOT_PREC=_dot_precision(dtype), ORDER=_grid_order(p, "attn_fwd"),
                         **_pass_args(p))
            launches.append(Launch("attn_fwd", role, grid, (g.head0, g.head_step, g.count, per_class), meta, p.terms))
    return tuple(launches)


def backward_plan(spec, B: int, H: int, n: int, dk: int, dv: int, dtype: torch.dtype,
                  tuning: Tuning | None = None) -> BackwardPlan:
    """The backward's launches (arguments as :func:`forward_plan`): a delta launch where a group has
    no dQ pass, the dQ passes (the first of a group writes delta), then one dK/dV launch per term,
    each adding onto the previous one (owned transposed passes add their dQ there too; an owned
    Band term has two, even and odd chunks, and adds its dQ there)."""
    return _backward_plan(tuple(spec), B, H, n, dk, dv, dtype, tuning)


@functools.lru_cache(maxsize=256)
def _backward_plan(spec, B, H, n, dk, dv, dtype, tuning):
    groups = decode(spec)
    dkp, dvp = padded_dim(dk), padded_dim(dv)
    d_pad = max(dkp, dvp)
    tile = lambda role: tile_config(role, d_pad, dtype, interpreter=INTERPRET, tuning=tuning)
    short_run = short_run_tiles(tuning)
    max_class = tile("dkdv_owned").block_n
    step_keys = owned_step_keys(tuning)
    band = tile("dkdv_band")
    owned, chunk = {}, {}  # per (group, pass): the owned stride tile, the owned band's key tiles per program
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g.passes):
            owned[gi, pi] = _owned_tile(p, n, max_class)
            chunk[gi, pi] = _band_chunk(p, band.block_m, band.block_n)
        for pi, p in enumerate(g.passes):
            choice = owned_band(tuning)
            if choice is None:  # the measured rule (bf16/fp16, head dim <= 64): a short window, and a dQ
                # pass that writes delta anyway
                others_dq = any(not owned[gi, pj] and not chunk[gi, pj] for pj in range(len(g.passes)) if pj != pi)
                measured = dtype != torch.float32 and d_pad <= 64
                choice = measured and others_dq and p.window <= OWNED_BAND_TILES * band.block_n
            chunk[gi, pi] = chunk[gi, pi] if choice else 0
    no_dq = {key: bool(owned[key] or chunk[key]) for key in owned}
    # a group made only of summary terms leaves non-summary keys untouched: start from zeros
    zero_dkdv = any(not any(p.has_range for p in g.passes) for g in groups)
    no_dq_pass = any(all(no_dq[gi, pi] for pi in range(len(g.passes))) for gi, g in enumerate(groups))
    common = {"DK_PAD": dkp, "DV_PAD": dvp, "DOT_PREC": _dot_precision(dtype)}
    launches = []
    if no_dq_pass:
        # delta for every row first (the key-tile programs read it for any query)
        launches.append(Launch("attn_bwd_delta", "delta", (ceil_div(B * H * n, _DELTA_ROWS),), (),
                               MappingProxyType({"BLOCK": _DELTA_ROWS, "DV_PAD": dvp})))
    for gi, g in enumerate(groups):
        first = True
        for pi, p in enumerate(g.passes):
            if no_dq[gi, pi]:
                continue
            role = _role("dq", p.step, p.sum_c > 0)
            t = tile(role)
            grid, per_class = _query_grid(p, n, t.block_m, B * g.count)
            meta = _meta(t, HAS_RANGE=p.has_range, FIRST=first, SPLIT=_split(p, n, t.block_m, t.block_n, short_run),
                         ORDER=_grid_order(p, "attn_bwd_dq"), **common, **_pass_args(p))
            launches.append(Launch("attn_bwd_dq", role, grid, (g.head0, g.head_step, g.count, per_class), meta, p.terms))
            first = False
    for gi, g in enumerate(groups):
        first = not zero_dkdv
        for pi, p in enumerate(g.passes):
            for is_summary in [False] * p.has_range + [True] * (p.sum_c > 0):
                own = owned[gi, pi] if not is_summary else 0
                per_program = chunk[gi, pi] if not is_summary else 0
                role = "dkdv_owned" if own else "dkdv_band" if per_program else _role("dkdv", p.step, is_summary)
                t = tile(role)
                bn = own or t.block_n
                split = is_summary or _split(p, n, bn, t.block_m, short_run)
                term = (p.summary,) if is_summary else (p.range_term,)
                flags = {"IS_SUMMARY": is_summary, "ACCUMULATE": not first, "OWNED": bool(own or per_program),
                         "SPLIT": split, "ONE_LOOP": split and not per_program and _one_loop(p, is_summary),
                         **common, **_pass_args(p)}
                if per_program:
                    # even chunks, then odd ones: no two programs of a launch touch the same dQ rows
                    n_chunks = ceil_div(n, per_program * bn)
                    for parity in (0, 1):
                        programs = (n_chunks - parity + 1) // 2
                        if programs:
                            launches.append(Launch("attn_bwd_dkdv", role, (programs, B * g.count),
                                                   (g.head0, g.head_step, g.count, 1),
                                                   _meta(t, bn, CHUNK=per_program, PARITY=parity, CHUNK_STEP=2, ORDER=0,
                                                         **flags),
                                                   term))
                elif own > step_keys:
                    # a whole residue class per program, walked in key tiles of step_keys one after another
                    per_class = own // step_keys
                    launches.append(Launch("attn_bwd_dkdv", role, (p.step, B * g.count),
                                           (g.head0, g.head_step, g.count, per_class),
                                           _meta(t, step_keys, CHUNK=per_class, PARITY=0, CHUNK_STEP=1, ORDER=0,
                                                 **{**flags, "SPLIT": False, "ONE_LOOP": False}), term))
                else:
                    if is_summary:
                        keys = p.summary.count_below(n)  # every real compact key
                        if keys == 0:
                            continue
                        grid, per_class = (ceil_div(keys, bn), B * g.count), 1
                    else:
                        grid, per_class = _query_grid(p, n, bn, B * g.count)
                    order = 0 if own else _grid_order(p, "attn_bwd_dkdv", is_summary)
                    launches.append(Launch("attn_bwd_dkdv", role, grid, (g.head0, g.head_step, g.count, per_class),
                                           _meta(t, bn, CHUNK=0, PARITY=0, CHUNK_STEP=1, ORDER=order, **flags),
                                           term))
                first = False
    return BackwardPlan(tuple(launches), zero_dkdv, no_dq_pass)


# ---------------------------------------------------------------------------------------------
# Forward / backward launchers
# ---------------------------------------------------------------------------------------------


def call_constexprs(kernel: str, qk_scale: float) -> dict[str, object]:
    """The constexprs a launch of ``kernel`` takes from its call rather than from its plan: the
    forward's ``FOLD`` (scores scaled inside one fused multiply-add, exact only for ``qk_scale > 0``,
    where the row maximum of the scaled scores is the scaled row maximum)."""
    return {"FOLD": qk_scale > 0} if kernel == "attn_fwd" else {}


def heads_like(q: torch.Tensor, width: int, dtype: torch.dtype | None = None, zero: bool = False) -> torch.Tensor:
    """A new ``[B, H, n, width]`` tensor (``q``'s batch, heads and positions; ``q.dtype`` unless
    ``dtype``; zeros with ``zero``) laid out in ``q``'s order: positions-major (``[B, n, H, width]``
    memory, heads inside each position) when ``q``'s heads are closer in memory than its positions,
    as for the model's views of one ``[B, n, 3·d]`` projection; heads-major (contiguous) otherwise.

    The output, dO and the gradients then share their producer's and consumer's layout: the model's
    ``y.transpose(1, 2).reshape(B, n, H·d)`` is a view, and the gradients of q, k, v leave as a
    row-wise concatenation instead of a transposing copy (docs/benchmarks.md measures both)."""
    t = torch.empty_strided(q.shape[:3] + (width,), _heads_like_strides(q, width), device=q.device,
                            dtype=dtype or q.dtype)
    return t.zero_() if zero else t


def _heads_like_strides(q: torch.Tensor, width: int) -> tuple[int, int, int, int]:
    """The strides of ``heads_like(q, width)``: positions-major when ``q``'s heads are closer in
    memory than its positions, else heads-major (contiguous)."""
    _, H, n, _ = q.shape
    return (n * H * width, width, H * width, 1) if q.stride(1) < q.stride(2) else (H * n * width, n * width, width, 1)


def launch_args(launch: Launch, q, k, v, out, lse, qk_scale: float, scale: float, grads: tuple = ()) -> tuple:
    """The positional arguments of one launch of a plan (constexprs apart: ``launch.meta`` and
    :func:`call_constexprs`): the tensors, their strides over batch, heads and positions (the last
    dimension is contiguous), the shape, the launch's program arguments and the scales.
    ``grads`` = ``(do, dq, dk, dv, delta)`` for the backward's launches: dO shares ``out``'s
    strides, dK ``dq``'s; dV has its own. The launchers and ``bench tiles --sass`` (placeholder
    tensors) build their calls here."""
    B, H, n, dk = q.shape
    dv = v.shape[-1]
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    if launch.kernel == "attn_fwd":
        return (q, k, v, out, lse, *strides, n, H, *launch.args, qk_scale, dk, dv)
    do, dq, dkk, dvv, delta = grads
    if launch.kernel == "attn_bwd_delta":
        return (out, do, delta, B * H * n, n, H, *out.stride()[:3], dv)
    tail = (n, H, *launch.args, qk_scale, scale, dk, dv)
    if launch.kernel == "attn_bwd_dq":
        return (q, k, v, out, do, dq, lse, delta, *strides, *dq.stride()[:3], *tail)
    return (q, k, v, do, dkk, dvv, dq, lse, delta, *strides, *dq.stride()[:3], *dvv.stride()[:3], *tail)


def _forward(q, k, v, spec, scale, tuning, out=None):
    """``(out, lse)``; ``out``: a ``[B, H, n, dv]`` view to write (default :func:`heads_like`)."""
    B, H, n, dk = q.shape
    out = heads_like(q, v.shape[-1]) if out is None else out
    lse = torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    qk_scale = scale * math.log2(math.e)
    for launch in _forward_plan(tuple(spec), B, H, n, dk, v.shape[-1], q.dtype, tuning):
        kernels.attn_fwd[launch.grid](*launch_args(launch, q, k, v, out, lse, qk_scale, scale),
                                      **call_constexprs(launch.kernel, qk_scale), **launch.meta)
    return out, lse


def _backward(do, q, k, v, out, lse, spec, scale, tuning, grads=None):
    """``(dq, dk, dv)``; ``grads``: ``[B, H, n, d]`` views to write them into, dq and dk with equal
    strides (default: new :func:`heads_like` tensors)."""
    B, H, n, dk = q.shape
    dv = v.shape[-1]
    plan = _backward_plan(tuple(spec), B, H, n, dk, dv, q.dtype, tuning)
    if grads is None:
        dkk = heads_like(q, dk, k.dtype, zero=plan.zero_dkdv)
        dvv = heads_like(q, dv, v.dtype, zero=plan.zero_dkdv)
        dq = heads_like(q, dk, zero=plan.zero_dq)
    else:
        dq, dkk, dvv = grads
        for t, zero in ((dq, plan.zero_dq), (dkk, plan.zero_dkdv), (dvv, plan.zero_dkdv)):
            if zero:
                t.zero_()
    # out and dO share strides in the kernels, those heads_like gives: the forward made out so, and
    # the model's dO arrives so (the gradient of a view of out's layout); anything else is copied once
    layout = _heads_like_strides(q, dv)
    out, do = (t if t.stride() == layout else heads_like(q, dv, t.dtype).copy_(t) for t in (out, do))
    delta = torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    qk_scale = scale * math.log2(math.e)
    grads = (do, dq, dkk, dvv, delta)
    for launch in plan.launches:
        getattr(kernels, launch.kernel)[launch.grid](*launch_args(launch, q, k, v, out, lse, qk_scale, scale, grads),
                                                     **launch.meta)
    return dq, dkk, dvv


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile: no graph breaks) and autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("sparse_transformer::triton_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: list[int], scale: float,
                  tuning: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, n, dv], lse [B, H, n] fp32, log2 units)``. ``tuning``: a :meth:`Tuning.encode`
    list, ``[]`` for the tile tables; the backward of this call uses it too."""
    return _forward(q, k, v, spec, scale, Tuning.decode(tuning))


@attention_fwd.register_fake
def _(q, k, v, spec, scale, tuning):
    B, H, n, _ = q.shape
    return heads_like(q, v.shape[-1]), q.new_empty(B, H, n, dtype=torch.float32)


@torch.library.custom_op("sparse_transformer::triton_attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, spec: list[int], scale: float,
                  tuning: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, spec, scale, Tuning.decode(tuning))


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, spec, scale, tuning):
    # the kernels write the gradients in q's order (heads_like), whatever k's and v's strides;
    # empty_like would promise the inputs' own strides
    return heads_like(q, q.shape[-1]), heads_like(q, k.shape[-1], k.dtype), heads_like(q, v.shape[-1], v.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, spec, scale, tuning = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.spec, ctx.scale, ctx.tuning = spec, scale, tuning
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.spec, ctx.scale, ctx.tuning)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("sparse_transformer::triton_attention_fwd", _attention_backward,
                                setup_context=_setup_context)


# One packed projection in, one packed gradient out: the model's [B, n, 2·H·dk + H·dv] q, k, v
# projection is read in place, and the backward writes dQ, dK and dV into one tensor of its shape,
# the gradient the projection's backward takes, instead of three that autograd concatenates.


@torch.library.custom_op("sparse_transformer::triton_attention_qkvpacked_fwd", mutates_args=())
def attention_qkvpacked_fwd(qkv: torch.Tensor, n_heads: int, qk_dim: int, spec: list[int], scale: float,
                            tuning: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, n, H·dv], lse [B, H, n] fp32, log2 units)`` of the heads of ``qkv`` ``[B, n, W]``
    (``common.split_heads``); ``tuning`` as in :func:`attention_fwd`."""
    q, k, v = split_heads(qkv, n_heads, qk_dim)
    B, H, n, dv = v.shape
    out = qkv.new_empty(B, n, H * dv)
    _, lse = _forward(q, k, v, spec, scale, Tuning.decode(tuning), out=out.view(B, n, H, dv).transpose(1, 2))
    return out, lse


@attention_qkvpacked_fwd.register_fake
def _(qkv, n_heads, qk_dim, spec, scale, tuning):
    B, n, W = qkv.shape
    return qkv.new_empty(B, n, W - 2 * qk_dim), qkv.new_empty(B, n_heads, n, dtype=torch.float32)


@torch.library.custom_op("sparse_transformer::triton_attention_qkvpacked_bwd", mutates_args=())
def attention_qkvpacked_bwd(do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, n_heads: int,
                            qk_dim: int, spec: list[int], scale: float, tuning: list[int]) -> torch.Tensor:
    """The gradient of ``qkv`` ``[B, n, W]`` (contiguous) from ``do`` ``[B, n, H·dv]``."""
    q, k, v = split_heads(qkv, n_heads, qk_dim)
    B, H, n, dv = v.shape
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    heads = lambda t: t.reshape(B, n, H, dv).transpose(1, 2)  # dO arrives contiguous: a view
    _backward(heads(do), q, k, v, heads(out), lse, spec, scale, Tuning.decode(tuning),
              grads=split_heads(dqkv, n_heads, qk_dim))
    return dqkv


@attention_qkvpacked_bwd.register_fake
def _(do, qkv, out, lse, n_heads, qk_dim, spec, scale, tuning):
    return torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)


def _setup_packed_context(ctx, inputs, output):
    qkv, n_heads, qk_dim, spec, scale, tuning = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (n_heads, qk_dim, spec, scale, tuning)
    ctx.mark_non_differentiable(lse)


def _packed_backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return attention_qkvpacked_bwd(grad_out, qkv, out, lse, *ctx.args), None, None, None, None, None


torch.library.register_autograd("sparse_transformer::triton_attention_qkvpacked_fwd", _packed_backward,
                                setup_context=_setup_packed_context)
