"""Launchers for the Triton kernels, the torch custom ops that wrap them, and their autograd.

A pattern is not a tensor, so it reaches the custom op as a flat tuple of ints (:func:`encode`):
its head groups, each an arithmetic progression of heads sharing one term list. Each group runs as
a few *passes*, one kernel launch each (kernels.py explains the virtual sequences; docs/design.md §4 how
the plan reads them off the pattern's terms):

* one natural-order pass holding the group's Band or Block term and its Summary term, walked by one
  online softmax (fixed ``both`` is a single launch);
* one transposed-order pass per Stride term, which starts its online softmax from the previous
  pass's output and lse, so the two query orders of strided ``both`` merge exactly with no merge
  kernel.

Backward, two modes (kernels.py says what each kernel does):

* ``deterministic=True``: the dQ passes first (the first one also writes delta = rowsum(dO·O)), then
  one dK/dV launch per term, each adding onto the previous one. No atomics: bitwise reproducible.
  A transposed pass whose residue classes fit one key tile has no dQ pass: its dK/dV launch adds
  dQ too (kernels.py, "owned"), since one program holds all the keys its queries read.
* ``deterministic=False`` with :data:`FUSED_DQ` on (off: measured no faster, see there): one delta launch, then the
  same dK/dV launches with dQ fused in (fp32 atomic adds into a zeroed buffer, cast at the end).
  Two fewer matmuls per (query, key) tile pair and no query-side walk; dQ's last bits vary between
  runs. With it off (the default) ``deterministic=False`` runs the atomic-free backward too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from ...patterns import Band, Block, Pattern, Stride, Summary, Term, ceil_div
from . import kernels

_BAND, _BLOCK, _STRIDE, _SUMMARY = 0, 1, 2, 3
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on Triton's CPU interpreter


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
# Block sizes
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per launch role and padded head dim; BLOCK_M counts
# queries and BLOCK_N keys in every kernel. Roles: "fwd", "dq", "dkdv" for natural-order passes of
# a band or block term, "fwd_summary" and "dq_summary" for natural passes that hold a summary term
# (with or without a block), "*_stride" for the transposed passes, "dkdv_summary" for the summary
# keys, "dkdv_owned" for a transposed pass whose residue classes fit one key tile (its BLOCK_N is the
# longest class it takes; the tile is the class length rounded up to a power of two), "dkdv_fused"
# for the opt-in atomic-dQ backward.
# Head dim 64 (bf16): two runs of scripts/gpu_tune.py on an H200 (2026-11-28; strided l=128 and fixed
# l=128 c=32 at n=16K B=8, strided l=256 at 64K B=2, strided l=1024 at 1M; 8 heads), each launch
# timed on its own. The short band and stride passes walk one masked loop (SHORT_RUN_TILES) and want
# narrow tiles there (dQ 64x32, stride dK/dV 16x64; the band dK/dV went from 0.63 to 0.43 ms at 16K
# against the first sweep's 32x128); the summary passes keep 64x64 (fwd, dQ: larger tiles were 2-50 %
# slower) and dK/dV 32x64 (3.36 -> 2.99 ms). fwd+bwd, do_bench medians, against the one tile set per
# kernel used before (owned stride backward in both): strided 16K 2.14 -> 1.73 ms, fixed 16K 6.85 ->
# 6.49, strided 64K 2.71 -> 2.38, strided 1M 45.8 -> 46.6 (one or two calls per median at 1M: within
# its spread). 16/32 reuse the 64 entries;
# 128 keeps the larger-warp tiles that passed the GPU tests. "dkdv_fused" keeps the key tile 128: its
# atomics per matmul flop fall as 1 / BLOCK_N (as FlashAttention 2's atomic dQ).
_D128_FWD, _D128_DQ, _D128_DKDV = (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2)


def _by_dim(d64, d128):
    return {16: d64, 32: d64, 64: d64, 128: d128}


CONFIGS = {
    "fwd": _by_dim((64, 64, 4, 3), _D128_FWD),
    "fwd_summary": _by_dim((64, 64, 4, 3), _D128_FWD),
    "fwd_stride": _by_dim((64, 64, 4, 3), _D128_FWD),
    "dq": _by_dim((64, 32, 4, 3), _D128_DQ),
    "dq_summary": _by_dim((64, 64, 4, 3), _D128_DQ),
    "dq_stride": _by_dim((64, 32, 4, 3), _D128_DQ),
    "dkdv": _by_dim((64, 64, 4, 3), _D128_DKDV),
    "dkdv_stride": _by_dim((16, 64, 4, 3), _D128_DKDV),
    "dkdv_summary": _by_dim((32, 64, 4, 3), _D128_DKDV),
    # the dQ tile [BLOCK_M, d] fp32 joins the dK/dV accumulators: d 128 takes classes up to 64 keys
    "dkdv_owned": _by_dim((32, 128, 4, 3), (32, 64, 8, 2)),
    "dkdv_fused": _by_dim((32, 128, 4, 3), _D128_DKDV),
}
# fp32 tiles are twice the bytes: halve them and pipeline two deep so K/V stages fit shared memory.
_FP32_CONFIG = {"fwd": (64, 32, 4, 2), "dq": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dkdv_owned": (32, 64, 4, 2),
                "dkdv_fused": (32, 64, 4, 2)}
# The fused-dQ backward (non-deterministic mode only) passed the GPU tests on an H200 (2026-11-28) but
# did not pay: at n = 16K (bf16, d 64, B 8, H 8) it ran strided l=128 fwd+bwd in 2.30 ms and fixed
# l=128 c=32 in 7.78 ms against 2.21 / 7.04 ms for the atomic-free backward; its best tiles gained
# 6 % / 3 % (within run-to-run spread) and at n = 1M it was slower (50.0 vs 46.5 ms). So it stays
# off: both modes run the atomic-free backward. Tests and scripts/gpu_triton_check.py switch it on.
FUSED_DQ = False
_DELTA_ROWS = 64  # rows per program of the delta kernel
# The CPU interpreter's cost is per program and per op: mid-size tiles keep tests quick while still
# giving several tiles (and every masked/unmasked run) at test sizes. Its owned classes are at most
# 32 long, so test lengths reach both the owned and the two-pass schedule of the stride term.
_INTERPRET_CONFIG = (32, 32, 1, 1)


def _config(role: str, d_pad: int, dtype: torch.dtype):
    if INTERPRET:
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        return _FP32_CONFIG[role] if role in _FP32_CONFIG else _FP32_CONFIG[role.split("_")[0]]
    table = CONFIGS[role]
    return table[d_pad] if d_pad in table else table[max(k for k in table if k <= d_pad)]


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 tensor-core products per dot (error near fp32's; plain tf32 costs
    # ~3e-4 relative). "ieee" lowers to FMA loops whose compile did not finish in minutes at d=128.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _pass_args(p: _Pass):
    return {"STEP": p.step, "WINDOW": p.window, "BLOCK": p.block, "OFFSET": p.offset, "SUM_C": p.sum_c,
            "SUM_L": p.sum_l, "SUM_LO": p.sum_lo, "SUM_EARLIER": p.sum_earlier}


# A range term whose rows read at most this many tiles runs as one masked loop (kernels._segments).
# H200 (gpu_tune.py, tiles as CONFIGS): strided l=128 16K fwd+bwd 2.06 ms always split, 1.74 at 4,
# 1.73 at 8; strided l=256 64K 2.53 / 2.53 / 2.38; fixed and strided 1M within 1-3 %.
SHORT_RUN_TILES = 8


def _split(p: _Pass, n: int, block_m: int, block_n: int) -> bool:
    """Whether the range term of pass ``p`` walks its tiles as masked head, full middle, masked tail
    (long ranges) rather than one masked loop: the keys one query tile reads (or, in dK/dV, the
    queries one key tile meets, the same span; the term's ``key_span``) against ``SHORT_RUN_TILES``
    tiles. A pass without a range term reads as spanning ``n`` (its launch has no range walk)."""
    span = p.range_term.key_span(n, block_m) if p.range_term else n
    return span > SHORT_RUN_TILES * block_n


def _query_grid(p: _Pass, n: int, block_m: int, bh: int):
    """The launch grid of a pass over tiles of ``block_m`` rows, and its tiles per residue run."""
    if p.step == 1:
        return (ceil_div(n, block_m), bh), 1
    per_class = ceil_div(p.length(n), block_m)
    return (p.step * per_class, bh), per_class


# ---------------------------------------------------------------------------------------------
# Forward / backward launchers
# ---------------------------------------------------------------------------------------------


def _forward(q, k, v, spec, scale):
    B, H, n, dk = q.shape
    dv = v.shape[-1]
    out = torch.empty(B, H, n, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    dkp, dvp = _pad(dk), _pad(dv)
    for g in decode(spec):
        for i, p in enumerate(g.passes):
            bm, bn, warps, stages = _config(role("fwd", p.step, p.sum_c > 0), max(dkp, dvp), q.dtype)
            grid, per_class = _query_grid(p, n, bm, B * g.count)
            kernels.attn_fwd[grid](
                q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                n, H, g.head0, g.head_step, g.count, per_class, scale * math.log2(math.e), dk, dv,
                HAS_RANGE=p.has_range, INIT_FROM_OUT=i > 0, SPLIT=_split(p, n, bm, bn), BLOCK_M=bm, BLOCK_N=bn,
                DK_PAD=dkp, DV_PAD=dvp,
                DOT_PREC=_dot_precision(q.dtype), num_warps=warps, num_stages=stages, **_pass_args(p))
    return out, lse


def role(kernel: str, step: int, summary: bool) -> str:
    """The CONFIGS entry of a launch of ``kernel`` ("fwd", "dq" or "dkdv") over a pass of virtual
    step ``step``: transposed (``step > 1``), holding a summary term (``summary``; for dK/dV: the
    summary keys' launch), or a natural-order range term. The owned and fused dK/dV launches have
    their own entries."""
    return kernel + ("_stride" if step > 1 else "_summary" if summary else "")


def _owned_tile(p: _Pass, n: int, d_pad: int, dtype: torch.dtype) -> int:
    """The key tile that holds a whole residue class of transposed pass ``p``, or 0 when its classes
    are longer than ``dkdv_owned`` takes (then the pass runs as a dQ pass plus a dK/dV launch)."""
    if p.step == 1:
        return 0
    length = p.length(n)
    return max(16, triton.next_power_of_2(length)) if length <= _config("dkdv_owned", d_pad, dtype)[1] else 0


def _backward(do, q, k, v, out, lse, spec, scale, deterministic=True):
    B, H, n, dk = q.shape
    dv = v.shape[-1]
    do = do.contiguous()  # shares out's (contiguous) strides in the kernels
    fused = FUSED_DQ and not deterministic
    groups = decode(spec)
    dkp, dvp = _pad(dk), _pad(dv)
    d_pad = max(dkp, dvp)
    owned = {(gi, pi): _owned_tile(p, n, d_pad, q.dtype)
             for gi, g in enumerate(groups) for pi, p in enumerate(g.passes)}
    # a group made only of summary terms leaves non-summary keys untouched: start from zeros
    needs_zero = any(not any(p.has_range for p in g.passes) for g in groups)
    alloc = torch.zeros if needs_zero else torch.empty
    dkk = alloc(B, H, n, dk, device=q.device, dtype=k.dtype)
    dvv = alloc(B, H, n, dv, device=q.device, dtype=v.dtype)
    delta = torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    prec = _dot_precision(q.dtype)
    qk_scale = scale * math.log2(math.e)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    # a group whose every pass is owned has no dQ pass: nothing writes delta or the dQ rows its
    # classes never read (the first ``offset`` rows of each class), so both come from here
    no_dq_pass = not fused and any(all(owned[gi, pi] for pi in range(len(g.passes))) for gi, g in enumerate(groups))

    if fused or no_dq_pass:
        # delta for every row first (the key-tile programs read it for any query)
        kernels.attn_bwd_delta[(ceil_div(B * H * n, _DELTA_ROWS),)](
            out.contiguous(), do, delta, B * H * n, dv, BLOCK=_DELTA_ROWS, DV_PAD=dvp)
    if fused:  # dQ is summed in fp32 whatever the input dtype, since many programs add into each row
        dq = torch.zeros(B, H, n, dk, device=q.device, dtype=torch.float32)
    else:
        dq = (torch.zeros if no_dq_pass else torch.empty)(B, H, n, dk, device=q.device, dtype=q.dtype)
        for gi, g in enumerate(groups):
            first = True
            for pi, p in enumerate(g.passes):
                if owned[gi, pi]:
                    continue
                bm, bn, warps, stages = _config(role("dq", p.step, p.sum_c > 0), d_pad, q.dtype)
                grid, per_class = _query_grid(p, n, bm, B * g.count)
                kernels.attn_bwd_dq[grid](
                    q, k, v, out, do, dq, lse, delta, *strides,
                    n, H, g.head0, g.head_step, g.count, per_class, qk_scale, scale, dk, dv,
                    HAS_RANGE=p.has_range, FIRST=first, SPLIT=_split(p, n, bm, bn), BLOCK_M=bm, BLOCK_N=bn,
                    DK_PAD=dkp, DV_PAD=dvp,
                    DOT_PREC=prec, num_warps=warps, num_stages=stages, **_pass_args(p))
                first = False

    for gi, g in enumerate(groups):
        first = not needs_zero
        for pi, p in enumerate(g.passes):
            launches = []
            if p.has_range:
                launches.append((False, p))
            if p.sum_c:
                launches.append((True, p))
            for is_summary, pp in launches:
                own = owned[gi, pi] if not is_summary else 0
                name = "dkdv_owned" if own else "dkdv_fused" if fused else role("dkdv", pp.step, is_summary)
                bm, bn, warps, stages = _config(name, d_pad, q.dtype)
                if own:
                    bn = own
                if is_summary:
                    keys = pp.summary.count_below(n)  # every real compact key
                    grid, per_class = (ceil_div(keys, bn), B * g.count), 1
                    if keys == 0:
                        continue
                else:
                    grid, per_class = _query_grid(pp, n, bn, B * g.count)
                kernels.attn_bwd_dkdv[grid](
                    q, k, v, do, dkk, dvv, dq, lse, delta, *strides,
                    n, H, g.head0, g.head_step, g.count, per_class, qk_scale, scale, dk, dv,
                    IS_SUMMARY=is_summary, ACCUMULATE=not first, DQ_MODE=2 if own else 1 if fused else 0,
                    SPLIT=is_summary or _split(pp, n, bn, bm),
                    BLOCK_M=bm, BLOCK_N=bn, DK_PAD=dkp, DV_PAD=dvp, DOT_PREC=prec, num_warps=warps,
                    num_stages=stages, **_pass_args(pp))
                first = False
    if fused and dq.dtype != q.dtype:
        dq = dq.to(q.dtype)
    return dq, dkk, dvv


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile: no graph breaks) and autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("sparse_transformer::triton_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: list[int], scale: float,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, n, dv], lse [B, H, n] fp32, log2 units)``; ``deterministic`` is for backward."""
    return _forward(q, k, v, spec, scale)


@attention_fwd.register_fake
def _(q, k, v, spec, scale, deterministic):
    B, H, n, _ = q.shape
    return q.new_empty(B, H, n, v.shape[-1]), q.new_empty(B, H, n, dtype=torch.float32)


@torch.library.custom_op("sparse_transformer::triton_attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, spec: list[int], scale: float,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, spec, scale, deterministic)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, spec, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, spec, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.spec, ctx.scale, ctx.deterministic = spec, scale, deterministic
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.spec, ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("sparse_transformer::triton_attention_fwd", _attention_backward,
                                setup_context=_setup_context)
