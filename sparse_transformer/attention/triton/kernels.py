"""Triton kernels for the factorized Sparse Transformer attention (docs/design.md §4). @triton.jit only.

Every pass of the attention is one launch of one of three kernels over a *virtual sequence*:

* ``attn_fwd``   one program per query tile: online softmax over the key tiles of its terms.
* ``attn_bwd_dq`` one program per query tile: dQ (and, on the first pass, delta = rowsum(dO·O)).
* ``attn_bwd_dkdv`` one program per key tile of one term: dK and dV.

The backward is atomic-free and bitwise reproducible: ``attn_bwd_dq`` passes, then
``attn_bwd_dkdv`` launches. dQ needs S = QKᵀ and dP = dO·Vᵀ again, so a term's backward does 7 tile
matmuls per pair, except where one more schedule is exact without atomics (``OWNED``): a transposed
pass whose residue classes are short (at most the ``dkdv_owned`` tile's ``BLOCK_N``). Then one
``attn_bwd_dkdv`` program holds every key of its class (in one key tile, or in key tiles of
``tiles.OWNED_STEP_KEYS`` walked one after another), so it is the only program that ever adds to the
dQ rows of that class for this term: it forms dS·K and adds it with a plain read-add-write, and the
term needs no dQ pass (5 matmuls per pair instead of 7, one walk over q, dO, lse and delta instead
of two). Strided at n <= l·128 (e.g. l = 128 at n = 16K) runs its stride term this way; a head
group whose every pass is owned gets delta from ``attn_bwd_delta``. A Band term can run owned too (``CHUNK > 0``): each program
takes a chunk of at least a window of keys, key tile after key tile, and two launches (even chunks,
then odd) keep any two programs of a launch off each other's dQ rows. Its dQ read-add-write per
(key tile, query tile) pair moves as many bytes as the dQ pass's loads it saves, so it pays only for
short windows (tiles.py, ``OWNED_BAND_TILES``).

The virtual sequence is either the natural order (``STEP == 1``: row ``t`` is position ``t``) or one
residue class of the transposed order (``STEP == l``: row ``t`` of class ``r`` is position
``t·l + r``). The transposition is index arithmetic on the row pointers, never a copy: strided's
stride term, dense-causal inside each residue class, becomes a contiguous causal problem.

A term gives every query row ``i`` one contiguous range of keys ``[lo(i), hi(i)]`` with ``lo`` and
``hi`` non-decreasing in ``i``; that is what makes tile skipping exact and cheap:

* range term, keys in the same virtual coordinates as the queries:
  ``Band(w)`` lo = i - w + 1, ``Band(None)`` lo = 0, ``Block(L)`` lo = (i // L)·L;
  hi = i - OFFSET (OFFSET = 1 for the stride term merged with a band, whose j = i the band holds).
* summary term, keys in *compact* coordinates ``u`` (the c summary cells of every block, in order):
  key ``u`` sits at position ``(u // C)·L + LO + u % C``; query ``i`` reads ``u < cnt(i)``.

The key tiles of a query tile then split into three runs: masked tiles at the start (the band's
lower edge), unmasked full tiles, masked tiles at the end (the diagonal). Only the edges pay for the
mask: the forward and dQ walk them as three loops, the dK/dV walk (the same split over query tiles)
as one loop with a uniform branch where three loops cost the kernel its asynchronous wgmmas
(``attn_bwd_dkdv`` says why). Softmax statistics are fp32 and kept in log2 units (``qk_scale``
folds in log2(e)).
An empty row (no key at all) has lse = -inf and output 0; the backward reads it as +inf, so every
probability in that row is exp2(-inf) = 0 and its gradients are 0, with no NaN.
"""

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Index helpers (all non-decreasing in the row index, which the tile ranges rely on)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _virtual_rows(pid, n, tiles_per_class, STEP: tl.constexpr, TILE: tl.constexpr):
    """(first position of the virtual sequence, its length, first row of this program's tile)."""
    if STEP == 1:
        base = pid * 0
        length = n + pid * 0
        row0 = pid * TILE
    else:
        base = pid // tiles_per_class
        length = (n - base + STEP - 1) // STEP
        row0 = (pid % tiles_per_class) * TILE
    return base, length, row0


@triton.jit
def _key_lo(i, IS_SUMMARY: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """First key (virtual or compact coordinates) that row ``i`` reads."""
    if IS_SUMMARY:
        return i * 0
    elif BLOCK > 0:
        return (i // BLOCK) * BLOCK
    elif WINDOW > 0:
        return tl.maximum(i - WINDOW + 1, 0)
    else:
        return i * 0


@triton.jit
def _key_hi(i, IS_SUMMARY: tl.constexpr, OFFSET: tl.constexpr, SUM_C: tl.constexpr,
            SUM_L: tl.constexpr, SUM_LO: tl.constexpr, SUM_EARLIER: tl.constexpr):
    """Last key row ``i`` reads (may be lo - 1: no key). Summary: cnt(i) - 1."""
    if IS_SUMMARY:
        cnt = (i // SUM_L) * SUM_C
        if not SUM_EARLIER:
            cnt += tl.minimum(tl.maximum(i % SUM_L - SUM_LO + 1, 0), SUM_C)
        return cnt - 1
    else:
        return i - OFFSET


@triton.jit
def _query_lo(j, IS_SUMMARY: tl.constexpr, OFFSET: tl.constexpr, SUM_C: tl.constexpr,
              SUM_L: tl.constexpr, SUM_LO: tl.constexpr, SUM_EARLIER: tl.constexpr):
    """First query row that reads key ``j`` (the inverse of ``_key_hi``)."""
    if IS_SUMMARY:
        if SUM_EARLIER:
            return (j // SUM_C + 1) * SUM_L
        else:
            return (j // SUM_C) * SUM_L + SUM_LO + j % SUM_C
    else:
        return j + OFFSET


@triton.jit
def _query_hi(j, length, IS_SUMMARY: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """Last query row that reads key ``j`` (the inverse of ``_key_lo``), clipped to the sequence."""
    if IS_SUMMARY:
        return length - 1 + j * 0
    elif BLOCK > 0:
        return tl.minimum((j // BLOCK + 1) * BLOCK, length) - 1
    elif WINDOW > 0:
        return tl.minimum(j + WINDOW, length) - 1
    else:
        return length - 1 + j * 0


@triton.jit
def _key_pos(kidx, base, STEP: tl.constexpr, IS_SUMMARY: tl.constexpr, SUM_C: tl.constexpr,
             SUM_L: tl.constexpr, SUM_LO: tl.constexpr):
    """Sequence position of key ``kidx`` (a gather for the compact summary keys)."""
    if IS_SUMMARY:
        return (kidx // SUM_C) * SUM_L + SUM_LO + kidx % SUM_C
    else:
        return base + kidx * STEP


@triton.jit
def _segments(lo_first, lo_last, hi_first, hi_last, limit, TILE: tl.constexpr, SPLIT: tl.constexpr):
    """Split the tiles covering ``[lo_first, hi_last]`` into masked head ``[start, f_lo)``,
    unmasked full tiles ``[f_lo, f_hi)`` and masked tail ``[f_hi, end)``.

    A tile is full when every row of the other side reads all of it: it starts at or after the
    last row's lower edge and ends at or before the first row's upper edge (and inside ``limit``).
    Without ``SPLIT`` every tile is one masked run ``[start, end)``: for a short range (a band of a
    few tiles) one loop that the compiler pipelines beats three loops of one iteration each.
    """
    start = (lo_first // TILE) * TILE
    end = hi_last + 1
    if not SPLIT:
        return start, end, end, end
    f_lo = tl.maximum((lo_last + TILE - 1) // TILE * TILE, start)
    f_hi = (tl.minimum(hi_first + 1, limit) // TILE) * TILE
    # no full tile: everything is one masked run [start, end)
    full = f_hi > f_lo
    f_lo = tl.where(full, f_lo, start)
    f_hi = tl.where(full, f_hi, start)
    return start, f_lo, f_hi, end


@triton.jit
def _load_rows(ptr, pos, row_ok, offs_d, d, stride_n, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows ``pos`` of a [seq, d] matrix as a [len(pos), D_PAD] tile; masked rows and the padded
    head-dim columns read 0."""
    ptrs = ptr + pos[:, None] * stride_n + offs_d[None, :]
    if ROW_MASK:
        if EVEN_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < d), other=0.0)
    else:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < d, other=0.0)


@triton.jit
def _key_tile(k_ptr, skn, k0, key_end, base, offs_dk, dk,
              STEP: tl.constexpr, IS_SUMMARY: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr,
              SUM_LO: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_DK: tl.constexpr):
    """Key tile ``[k0, k0 + BLOCK_N)`` of a query tile's walk (forward and dQ): the keys' indices in
    the term's coordinates, their sequence positions, which of them exist (``< key_end``) and K
    (absent keys read 0). Inlined: both walks compile to what they did with these lines in place."""
    kidx = k0 + tl.arange(0, BLOCK_N)
    kpos = _key_pos(kidx, base, STEP, IS_SUMMARY, SUM_C, SUM_L, SUM_LO)
    k_ok = kidx < key_end
    k = _load_rows(k_ptr, kpos, k_ok, offs_dk, dk, skn, MASK, EVEN_DK)
    return kidx, kpos, k_ok, k


@triton.jit
def _in_rows_range(kidx, row_lo, row_hi):
    """[query rows, keys]: whether each key of the tile is inside its row's ``[row_lo, row_hi]``."""
    return (kidx[None, :] >= row_lo[:, None]) & (kidx[None, :] <= row_hi[:, None])


@triton.jit
def _program_ids(ORDER: tl.constexpr):
    """(tile, batch·head) of this program on the grid ``(tiles, B·heads)``. The hardware starts the
    programs of a grid in its linear order, axis 0 fastest. ``ORDER == 0`` reads the axes as they
    are: every tile of one head, head after head (for programs of equal work; programs that read
    the same keys run side by side). Where a program's work grows or shrinks with its tile (a
    summary term, a stride term's causal runs, an unbounded band), the launch would otherwise end on
    one long program while the rest of the card idles; ``ORDER`` 1 and 2 map the same linear order
    tile-major, tile ``t`` of every head before any tile ``t ± 1``, with the longest first
    (longest-processing-time order): 1 from the last tile down (query tiles: a later row reads more
    keys), 2 from the first tile up (key tiles: an earlier key is read by more rows)."""
    if ORDER == 0:
        return tl.program_id(0), tl.program_id(1)
    n_tiles = tl.num_programs(0)
    n_bh = tl.num_programs(1)
    linear = tl.program_id(1) * n_tiles + tl.program_id(0)
    tile = linear // n_bh
    if ORDER == 1:
        tile = n_tiles - 1 - tile
    return tile, linear % n_bh


@triton.jit
def _program_head(pid_bh, head0, head_step, heads_in_group):
    """(batch, head) of batch·head program ``pid_bh``: it walks the heads of one group in every batch
    (int64, for the pointer offsets)."""
    b = (pid_bh // heads_in_group).to(tl.int64)
    h = (head0 + (pid_bh % heads_in_group) * head_step).to(tl.int64)
    return b, h


@triton.jit
def _query_program(n, head0, head_step, heads_in_group, tiles_per_class, STEP: tl.constexpr,
                   BLOCK_M: tl.constexpr, ORDER: tl.constexpr):
    """A query-tile program (forward and dQ): its batch and head, the virtual sequence's first
    position and length, and the tile's first row (``>= length``: nothing to do)."""
    pid_tile, pid_bh = _program_ids(ORDER)
    b, h = _program_head(pid_bh, head0, head_step, heads_in_group)
    base, length, m0 = _virtual_rows(pid_tile, n, tiles_per_class, STEP, BLOCK_M)
    return b, h, base, length, m0


@triton.jit
def _query_rows(m0, length, base, STEP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tile's rows, which of them exist, their sequence positions and the last row that exists."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    pos = base + rows * STEP
    m_last = tl.minimum(m0 + BLOCK_M, length) - 1
    return rows, row_ok, pos, m_last


@triton.jit
def _range_keys(rows, m0, m_last, length, WINDOW: tl.constexpr, BLOCK: tl.constexpr, OFFSET: tl.constexpr,
                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """A query tile's range term: each row's keys ``[lo, hi]``, and the key tiles as masked head
    ``[start, f_lo)``, full tiles ``[f_lo, f_hi)`` and masked tail ``[f_hi, end)``."""
    lo = _key_lo(rows, False, WINDOW, BLOCK)
    hi = _key_hi(rows, False, OFFSET, 0, 1, 0, False)
    start, f_lo, f_hi, end = _segments(
        _key_lo(m0, False, WINDOW, BLOCK), _key_lo(m_last, False, WINDOW, BLOCK),
        _key_hi(m0, False, OFFSET, 0, 1, 0, False), _key_hi(m_last, False, OFFSET, 0, 1, 0, False),
        length, BLOCK_N, SPLIT)
    return lo, hi, start, f_lo, f_hi, end


@triton.jit
def _summary_keys(rows, m0, m_last, n, SUM_C: tl.constexpr, SUM_L: tl.constexpr, SUM_LO: tl.constexpr,
                  SUM_EARLIER: tl.constexpr, BLOCK_N: tl.constexpr):
    """A query tile's summary term: each row's compact keys ``[lo, hi]``, and the key tiles as full
    tiles ``[f_lo, f_hi)`` and masked tail ``[f_hi, end)`` (every row starts at key 0: no head)."""
    lo = _key_lo(rows, True, 0, 0)
    hi = _key_hi(rows, True, 0, SUM_C, SUM_L, SUM_LO, SUM_EARLIER)
    _start, f_lo, f_hi, end = _segments(
        0, 0, _key_hi(m0, True, 0, SUM_C, SUM_L, SUM_LO, SUM_EARLIER),
        _key_hi(m_last, True, 0, SUM_C, SUM_L, SUM_LO, SUM_EARLIER), n, BLOCK_N, True)
    return lo, hi, f_lo, f_hi, end


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, row_lo, row_hi, k_start, k_stop, key_end,
               base, qk_scale, offs_dk, offs_dv, dk, dv,
               STEP: tl.constexpr, IS_SUMMARY: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr,
               SUM_LO: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PREC: tl.constexpr, FOLD: tl.constexpr):
    """Online softmax over key tiles ``k_start, k_start + BLOCK_N, ... < k_stop``. With ``FOLD``
    (``qk_scale > 0``) the running max is taken on the raw scores and scaled once per row, so each
    score costs one fused multiply-add (``s·qk_scale - m``) instead of a multiply and a subtract."""
    for k0 in range(k_start, k_stop, BLOCK_N):
        kidx, kpos, k_ok, k = _key_tile(k_ptr, skn, k0, key_end, base, offs_dk, dk,
                                        STEP, IS_SUMMARY, SUM_C, SUM_L, SUM_LO, MASK, BLOCK_N, EVEN_DK)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if not FOLD:
            s = s * qk_scale
        if MASK:
            s = tl.where(_in_rows_range(kidx, row_lo, row_hi), s, float("-inf"))
        if FOLD:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if FOLD:
            p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        else:
            p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptr, kpos, k_ok, offs_dv, dv, svn, MASK, EVEN_DV)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    n, n_heads, head0, head_step, heads_in_group, tiles_per_class, qk_scale, dk: tl.constexpr, dv: tl.constexpr,
    STEP: tl.constexpr, HAS_RANGE: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
    OFFSET: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr, SUM_LO: tl.constexpr,
    SUM_EARLIER: tl.constexpr, INIT_FROM_OUT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, ORDER: tl.constexpr, FOLD: tl.constexpr,
):
    """One query tile of one pass. With ``INIT_FROM_OUT`` the online softmax starts from an earlier
    pass's normalized output and lse (m = lse, l = 1, acc = o): the exact merge of two passes whose
    query orders differ, with no separate merge kernel."""
    b, h, base, length, m0 = _query_program(n, head0, head_step, heads_in_group, tiles_per_class, STEP, BLOCK_M, ORDER)
    if m0 >= length:
        return
    EVEN_DK: tl.constexpr = DK_PAD == dk
    EVEN_DV: tl.constexpr = DV_PAD == dv
    q_ptr = Q + b * sqb + h * sqh
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    o_ptr = O + b * sob + h * soh
    lse_ptr = LSE + (b * n_heads + h) * n

    rows, row_ok, pos, m_last = _query_rows(m0, length, base, STEP, BLOCK_M)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_rows(q_ptr, pos, row_ok, offs_dk, dk, sqn, True, EVEN_DK)

    if INIT_FROM_OUT:
        lse_prev = tl.load(lse_ptr + pos, mask=row_ok, other=float("-inf"))
        m_i = lse_prev
        l_i = tl.where(lse_prev == float("-inf"), 0.0, 1.0)
        acc = _load_rows(o_ptr, pos, row_ok, offs_dv, dv, son, True, EVEN_DV).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

    if HAS_RANGE:
        lo, hi, start, f_lo, f_hi, end = _range_keys(rows, m0, m_last, length, WINDOW, BLOCK, OFFSET, BLOCK_N, SPLIT)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, lo, hi, start, f_lo, end,
                                   base, qk_scale, offs_dk, offs_dv, dk, dv, STEP, False, 1, 1, 0,
                                   True, BLOCK_N, EVEN_DK, EVEN_DV, DOT_PREC, FOLD)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, lo, hi, f_lo, f_hi, end,
                                   base, qk_scale, offs_dk, offs_dv, dk, dv, STEP, False, 1, 1, 0,
                                   False, BLOCK_N, EVEN_DK, EVEN_DV, DOT_PREC, FOLD)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, lo, hi, f_hi, end, end,
                                   base, qk_scale, offs_dk, offs_dv, dk, dv, STEP, False, 1, 1, 0,
                                   True, BLOCK_N, EVEN_DK, EVEN_DV, DOT_PREC, FOLD)
    if SUM_C > 0:
        lo, hi, f_lo, f_hi, end = _summary_keys(rows, m0, m_last, n, SUM_C, SUM_L, SUM_LO, SUM_EARLIER, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, lo, hi, f_lo, f_hi, end,
                                   base, qk_scale, offs_dk, offs_dv, dk, dv, STEP, True, SUM_C, SUM_L,
                                   SUM_LO, False, BLOCK_N, EVEN_DK, EVEN_DV, DOT_PREC, FOLD)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, skn, svn, lo, hi, f_hi, end, end,
                                   base, qk_scale, offs_dk, offs_dv, dk, dv, STEP, True, SUM_C, SUM_L,
                                   SUM_LO, True, BLOCK_N, EVEN_DK, EVEN_DV, DOT_PREC, FOLD)

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + pos, lse, mask=row_ok)
    o_ptrs = o_ptr + pos[:, None] * son + offs_dv[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < dv))


# ---------------------------------------------------------------------------------------------
# Backward: P is recomputed from the saved lse; dS = P·(dP - delta) with delta = rowsum(dO·O).
# ---------------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_delta(O, DO, DELTA, rows, n, n_heads, sob, soh, son, dv: tl.constexpr, BLOCK: tl.constexpr,
                   DV_PAD: tl.constexpr):
    """delta = rowsum(dO·O) in fp32 for the ``rows`` = B·H·n rows of O and dO (strides ``so*``),
    written in [B, H, n] order. Only a head group whose every pass is owned needs it as its own
    launch: there no dQ pass writes delta before the key-tile programs, which read it for every
    query row they visit."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, DV_PAD)
    mask = (r[:, None] < rows) & (offs[None, :] < dv)
    r64 = r.to(tl.int64)
    bh = r64 // n
    row = (bh // n_heads) * sob + (bh % n_heads) * soh + (r64 % n) * son
    ptrs = row[:, None] + offs[None, :]
    o = tl.load(O + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, 1), mask=r < rows)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, row_lo, row_hi, k_start, k_stop, key_end,
              base, qk_scale, offs_dk, offs_dv, dk, dv,
              STEP: tl.constexpr, IS_SUMMARY: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr,
              SUM_LO: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ (unscaled) of one query tile over key tiles ``k_start, k_start + BLOCK_N, ... < k_stop``."""
    for k0 in range(k_start, k_stop, BLOCK_N):
        kidx, kpos, k_ok, k = _key_tile(k_ptr, skn, k0, key_end, base, offs_dk, dk,
                                        STEP, IS_SUMMARY, SUM_C, SUM_L, SUM_LO, MASK, BLOCK_N, EVEN_DK)
        v = _load_rows(v_ptr, kpos, k_ok, offs_dv, dv, svn, MASK, EVEN_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(_in_rows_range(kidx, row_lo, row_hi), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sgb, sgh, sgn,
    n, n_heads, head0, head_step, heads_in_group, tiles_per_class, qk_scale, sm_scale, dk: tl.constexpr, dv: tl.constexpr,
    STEP: tl.constexpr, HAS_RANGE: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
    OFFSET: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr, SUM_LO: tl.constexpr,
    SUM_EARLIER: tl.constexpr, FIRST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, ORDER: tl.constexpr,
):
    """dQ of one query tile over the key tiles of this pass's terms. The first pass of a head
    (``FIRST``) computes and stores delta and writes dQ; later passes read delta and add to dQ.
    O and dO share strides ``so*``; dQ has strides ``sg*`` (the launcher lays both out in q's order)."""
    b, h, base, length, m0 = _query_program(n, head0, head_step, heads_in_group, tiles_per_class, STEP, BLOCK_M, ORDER)
    if m0 >= length:
        return
    EVEN_DK: tl.constexpr = DK_PAD == dk
    EVEN_DV: tl.constexpr = DV_PAD == dv
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    o_off = b * sob + h * soh
    dq_off = b * sgb + h * sgh
    stat_ptr = (b * n_heads + h) * n

    rows, row_ok, pos, m_last = _query_rows(m0, length, base, STEP, BLOCK_M)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_rows(Q + b * sqb + h * sqh, pos, row_ok, offs_dk, dk, sqn, True, EVEN_DK)
    do = _load_rows(DO + o_off, pos, row_ok, offs_dv, dv, son, True, EVEN_DV)
    lse = tl.load(LSE + stat_ptr + pos, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty row: every p = 0
    if FIRST:
        o = _load_rows(O + o_off, pos, row_ok, offs_dv, dv, son, True, EVEN_DV)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + stat_ptr + pos, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + stat_ptr + pos, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, DK_PAD], tl.float32)

    if HAS_RANGE:
        lo, hi, start, f_lo, f_hi, end = _range_keys(rows, m0, m_last, length, WINDOW, BLOCK, OFFSET, BLOCK_N, SPLIT)
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, lo, hi, start, f_lo, end, base,
                       qk_scale, offs_dk, offs_dv, dk, dv, STEP, False, 1, 1, 0, True, BLOCK_N,
                       EVEN_DK, EVEN_DV, DOT_PREC)
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, lo, hi, f_lo, f_hi, end, base,
                       qk_scale, offs_dk, offs_dv, dk, dv, STEP, False, 1, 1, 0, False, BLOCK_N,
                       EVEN_DK, EVEN_DV, DOT_PREC)
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, lo, hi, f_hi, end, end, base,
                       qk_scale, offs_dk, offs_dv, dk, dv, STEP, False, 1, 1, 0, True, BLOCK_N,
                       EVEN_DK, EVEN_DV, DOT_PREC)
    if SUM_C > 0:
        lo, hi, f_lo, f_hi, end = _summary_keys(rows, m0, m_last, n, SUM_C, SUM_L, SUM_LO, SUM_EARLIER, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, lo, hi, f_lo, f_hi, end, base,
                       qk_scale, offs_dk, offs_dv, dk, dv, STEP, True, SUM_C, SUM_L, SUM_LO, False,
                       BLOCK_N, EVEN_DK, EVEN_DV, DOT_PREC)
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, skn, svn, lo, hi, f_hi, end, end, base,
                       qk_scale, offs_dk, offs_dv, dk, dv, STEP, True, SUM_C, SUM_L, SUM_LO, True,
                       BLOCK_N, EVEN_DK, EVEN_DV, DOT_PREC)

    dq = dq * sm_scale
    dq_ptrs = DQ + dq_off + pos[:, None] * sgn + offs_dk[None, :]
    st_mask = row_ok[:, None] & (offs_dk[None, :] < dk)
    if not FIRST:
        dq += tl.load(dq_ptrs, mask=st_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=st_mask)


@triton.jit
def _dkdv_mask(pt, rows, kidx, IS_SUMMARY: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
               OFFSET: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr, SUM_LO: tl.constexpr,
               SUM_EARLIER: tl.constexpr):
    """P^T [keys, queries] with the pairs the term does not allow set to 0."""
    lo = _key_lo(rows, IS_SUMMARY, WINDOW, BLOCK)
    hi = _key_hi(rows, IS_SUMMARY, OFFSET, SUM_C, SUM_L, SUM_LO, SUM_EARLIER)
    ok = (kidx[:, None] >= lo[None, :]) & (kidx[:, None] <= hi[None, :])
    return tl.where(ok, pt, 0.0)


@triton.jit
def _dkdv_tiles(dk_acc, dv_acc, k, v, q_ptr, do_ptr, dq_ptr, sqn, son, sgn, LSE_ROW, DELTA_ROW, kidx, q_start,
                q_stop, full_lo, full_hi, length, base, qk_scale, sm_scale, offs_dk, offs_dv, dk, dv,
                STEP: tl.constexpr, IS_SUMMARY: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
                OFFSET: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr, SUM_LO: tl.constexpr,
                SUM_EARLIER: tl.constexpr, MASK: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr, OWNED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles ``q_start, ... < q_stop``. Works on the
    transposed score tile [keys, queries] so dK and dV come out of plain dots. ``MASK``: row-masked
    loads and P masked to the term's pairs; with ``PARTIAL`` only for the query tiles outside
    ``[full_lo, full_hi)`` (the masked head and tail of ``_segments``, by a uniform branch), so one
    loop walks every query tile (``attn_bwd_dkdv``'s ``ONE_LOOP``). With ``OWNED`` (this program is
    the only one that touches those dQ rows) each query tile also receives this key tile's dQ share
    dSᵀ·K into ``dq_ptr`` with a plain read-add-write."""
    for m0 in range(q_start, q_stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        pos = base + rows * STEP
        q = _load_rows(q_ptr, pos, row_ok, offs_dk, dk, sqn, MASK, EVEN_DK)
        do = _load_rows(do_ptr, pos, row_ok, offs_dv, dv, son, MASK, EVEN_DV)
        if MASK:
            lse = tl.load(LSE_ROW + pos, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA_ROW + pos, mask=row_ok, other=0.0)
        else:
            lse = tl.load(LSE_ROW + pos)
            delta = tl.load(DELTA_ROW + pos)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASK:
            if PARTIAL:
                if (m0 < full_lo) | (m0 >= full_hi):
                    pt = _dkdv_mask(pt, rows, kidx, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L, SUM_LO,
                                    SUM_EARLIER)
            else:
                pt = _dkdv_mask(pt, rows, kidx, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L, SUM_LO, SUM_EARLIER)
        dv_acc = tl.dot(pt.to(do.dtype), do, dv_acc, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk_acc = tl.dot(dst, q, dk_acc, input_precision=DOT_PREC)
        if OWNED:
            # the fifth matmul: dQ[rows] += scale·dS·K; each query tile is visited once per launch,
            # by this program alone
            _owned_dq(dq_ptr, pos, row_ok, offs_dk, dk, sgn, dst, k, sm_scale, BLOCK_M, EVEN_DK, DOT_PREC)
    return dk_acc, dv_acc


@triton.jit
def _owned_dq(dq_ptr, pos, row_ok, offs_dk, dk, sgn, dst, k, sm_scale, BLOCK_M: tl.constexpr, EVEN_DK: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """dQ[pos] += sm_scale·dS·K by a plain read-add-write (``dst``: dSᵀ [keys, BLOCK_M]). Hopper's
    wgmma needs 64 rows on the product's M side: a query tile of fewer rows forms dQᵀ = Kᵀ·dSᵀ
    instead, the head dim as M (H200, strided l=128 16K owned launch 0.537/0.541 -> 0.514/0.513 ms,
    docs/benchmarks.md). Only for a head dim that fills its padded width (``EVEN_DK``): with Triton
    3.6 the transposed read-add-write of a padded head dim (40 in 64) faulted on the H200 (an
    illegal memory access; the plain product at the same shapes ran)."""
    DK_PAD: tl.constexpr = offs_dk.shape[0]
    if BLOCK_M < 64 and DK_PAD >= 64 and EVEN_DK:
        dqt = tl.dot(tl.trans(k), dst, input_precision=DOT_PREC) * sm_scale
        dqt_ptrs = dq_ptr + pos[None, :] * sgn + offs_dk[:, None]
        dqt_mask = row_ok[None, :] & (offs_dk[:, None] < dk)
        dqt += tl.load(dqt_ptrs, mask=dqt_mask, other=0.0).to(tl.float32)
        tl.store(dqt_ptrs, dqt.to(dq_ptr.dtype.element_ty), mask=dqt_mask)
    else:
        dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC) * sm_scale
        dq_ptrs = dq_ptr + pos[:, None] * sgn + offs_dk[None, :]
        dq_mask = row_ok[:, None] & (offs_dk[None, :] < dk)
        dq += tl.load(dq_ptrs, mask=dq_mask, other=0.0).to(tl.float32)
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=dq_mask)


@triton.jit
def _dkdv_key_tile(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, tile_id, b, h,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sgb, sgh, sgn, sdb, sdh, sdn,
                   n, n_heads, tiles_per_class, qk_scale, sm_scale, dk, dv,
                   STEP: tl.constexpr, IS_SUMMARY: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
                   OFFSET: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr, SUM_LO: tl.constexpr,
                   SUM_EARLIER: tl.constexpr, ACCUMULATE: tl.constexpr, OWNED: tl.constexpr, SPLIT: tl.constexpr,
                   ONE_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr,
                   DV_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """dK, dV (and with ``OWNED`` its dQ shares) of key tile ``tile_id`` of one term, for head (b, h)."""
    if IS_SUMMARY:
        base = tile_id * 0
        length = n + base
        n0 = tile_id * BLOCK_N
        # compact keys: every summary cell before position n (Summary.count_below(n) on the host)
        key_len = (n // SUM_L) * SUM_C + tl.minimum(tl.maximum(n % SUM_L - SUM_LO, 0), SUM_C)
    else:
        base, length, n0 = _virtual_rows(tile_id, n, tiles_per_class, STEP, BLOCK_N)
        key_len = length
    if n0 < key_len:
        EVEN_DK: tl.constexpr = DK_PAD == dk
        EVEN_DV: tl.constexpr = DV_PAD == dv
        stat_off = (b * n_heads + h) * n
        kidx = n0 + tl.arange(0, BLOCK_N)
        k_ok = kidx < key_len
        kpos = _key_pos(kidx, base, STEP, IS_SUMMARY, SUM_C, SUM_L, SUM_LO)
        offs_dk = tl.arange(0, DK_PAD)
        offs_dv = tl.arange(0, DV_PAD)
        k = _load_rows(K + b * skb + h * skh, kpos, k_ok, offs_dk, dk, skn, True, EVEN_DK)
        v = _load_rows(V + b * svb + h * svh, kpos, k_ok, offs_dv, dv, svn, True, EVEN_DV)
        dk_acc = tl.zeros([BLOCK_N, DK_PAD], tl.float32)
        dv_acc = tl.zeros([BLOCK_N, DV_PAD], tl.float32)

        n_last = tl.minimum(n0 + BLOCK_N, key_len) - 1
        start, f_lo, f_hi, end = _segments(
            _query_lo(n0, IS_SUMMARY, OFFSET, SUM_C, SUM_L, SUM_LO, SUM_EARLIER),
            _query_lo(n_last, IS_SUMMARY, OFFSET, SUM_C, SUM_L, SUM_LO, SUM_EARLIER),
            _query_hi(n0, length, IS_SUMMARY, WINDOW, BLOCK), _query_hi(n_last, length, IS_SUMMARY, WINDOW, BLOCK),
            length, BLOCK_M, SPLIT or IS_SUMMARY)
        q_ptr = Q + b * sqb + h * sqh
        do_ptr = DO + b * sob + h * soh
        dq_ptr = DQ + b * sgb + h * sgh
        lse_row = LSE + stat_off
        delta_row = DELTA + stat_off
        if ONE_LOOP:
            dk_acc, dv_acc = _dkdv_tiles(dk_acc, dv_acc, k, v, q_ptr, do_ptr, dq_ptr, sqn, son, sgn, lse_row, delta_row,
                                         kidx, start, end, f_lo, f_hi, length, base, qk_scale, sm_scale, offs_dk,
                                         offs_dv, dk, dv, STEP, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L,
                                         SUM_LO, SUM_EARLIER, True, True, BLOCK_M, EVEN_DK, EVEN_DV, OWNED, DOT_PREC)
        else:  # masked head, full middle, masked tail
            dk_acc, dv_acc = _dkdv_tiles(dk_acc, dv_acc, k, v, q_ptr, do_ptr, dq_ptr, sqn, son, sgn, lse_row, delta_row,
                                         kidx, start, f_lo, f_lo, f_lo, length, base, qk_scale, sm_scale, offs_dk,
                                         offs_dv, dk, dv, STEP, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L,
                                         SUM_LO, SUM_EARLIER, True, False, BLOCK_M, EVEN_DK, EVEN_DV, OWNED, DOT_PREC)
            dk_acc, dv_acc = _dkdv_tiles(dk_acc, dv_acc, k, v, q_ptr, do_ptr, dq_ptr, sqn, son, sgn, lse_row, delta_row,
                                         kidx, f_lo, f_hi, f_lo, f_hi, length, base, qk_scale, sm_scale, offs_dk,
                                         offs_dv, dk, dv, STEP, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L,
                                         SUM_LO, SUM_EARLIER, False, False, BLOCK_M, EVEN_DK, EVEN_DV, OWNED, DOT_PREC)
            dk_acc, dv_acc = _dkdv_tiles(dk_acc, dv_acc, k, v, q_ptr, do_ptr, dq_ptr, sqn, son, sgn, lse_row, delta_row,
                                         kidx, f_hi, end, f_hi, f_hi, length, base, qk_scale, sm_scale, offs_dk,
                                         offs_dv, dk, dv, STEP, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L,
                                         SUM_LO, SUM_EARLIER, True, False, BLOCK_M, EVEN_DK, EVEN_DV, OWNED, DOT_PREC)

        dk_acc = dk_acc * sm_scale
        dk_ptrs = DK + b * sgb + h * sgh + kpos[:, None] * sgn + offs_dk[None, :]
        dv_ptrs = DV + b * sdb + h * sdh + kpos[:, None] * sdn + offs_dv[None, :]
        mk = k_ok[:, None] & (offs_dk[None, :] < dk)
        mv = k_ok[:, None] & (offs_dv[None, :] < dv)
        if ACCUMULATE:
            dk_acc += tl.load(dk_ptrs, mask=mk, other=0.0).to(tl.float32)
            dv_acc += tl.load(dv_ptrs, mask=mv, other=0.0).to(tl.float32)
        tl.store(dk_ptrs, dk_acc.to(DK.dtype.element_ty), mask=mk)
        tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty), mask=mv)


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sgb, sgh, sgn, sdb, sdh, sdn,
    n, n_heads, head0, head_step, heads_in_group, tiles_per_class, qk_scale, sm_scale, dk: tl.constexpr, dv: tl.constexpr,
    STEP: tl.constexpr, IS_SUMMARY: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr,
    OFFSET: tl.constexpr, SUM_C: tl.constexpr, SUM_L: tl.constexpr, SUM_LO: tl.constexpr,
    SUM_EARLIER: tl.constexpr, ACCUMULATE: tl.constexpr, OWNED: tl.constexpr, SPLIT: tl.constexpr,
    CHUNK: tl.constexpr, PARITY: tl.constexpr, ONE_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, ORDER: tl.constexpr, CHUNK_STEP: tl.constexpr,
):
    """dK, dV of one key tile of one term (``CHUNK == 0``), or of the ``CHUNK`` consecutive key tiles
    of chunk ``CHUNK_STEP·pid + PARITY`` (``CHUNK > 0``): a Band term's even or odd chunk
    (``CHUNK_STEP == 2``, the owned band below) or one whole residue class of an owned transposed
    pass (``CHUNK_STEP == 1``, ``CHUNK`` = its tiles per class). The key tile is
    in the term's coordinates (virtual rows for a range term, compact summary index for a summary
    term); each key belongs to exactly one program of a launch, so ``ACCUMULATE`` (read-add-write
    over an earlier term's launch) needs no atomics. DO has O's strides ``so*``, DK and DQ strides
    ``sg*``, DV strides ``sd*`` (O's, or the V part's of one packed q, k, v gradient). With
    ``OWNED``, DQ holds dQ as the earlier launches left it, each program adding its keys' share;
    otherwise it is not touched.

    ``SPLIT`` walks a key tile's query tiles as masked head, full middle and masked tail; as three
    loops, or with ``ONE_LOOP`` as one loop whose full tiles skip the mask by a uniform branch. The
    three loops can cost every wgmma of the kernel its asynchrony: ptxas serializes them all (its
    C7515, "non wgmma instructions defining accumulator registers") when it moves the two
    accumulators dK and dV between the loops, as it did for the 32-query tiles of the band, block
    and summary launches. ``ops._one_loop`` says where the one loop measured faster.

    Owned band: a chunk of ``CHUNK·BLOCK_N >= window`` keys is read only by the query tiles from its
    first key to its last key plus the window, which meet no query tile of the chunks two ahead or
    two behind. So the even chunks run as one launch and the odd ones as the next, and each program
    adds its dQ shares with plain read-add-writes: within a launch no other program touches those
    rows, and within the program a barrier after each key tile orders its writes before the next
    key tile reads the same rows. An owned class longer than one key tile is walked the same way by
    its one program (``tiles.OWNED_STEP_KEYS``): no other program reads its keys' queries."""
    pid_tile, pid_bh = _program_ids(ORDER)
    b, h = _program_head(pid_bh, head0, head_step, heads_in_group)
    if CHUNK > 0:
        first = (CHUNK_STEP * pid_tile + PARITY) * CHUNK
        for tile_id in range(first, first + CHUNK):
            _dkdv_key_tile(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, tile_id, b, h,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sgb, sgh, sgn, sdb, sdh, sdn,
                           n, n_heads, tiles_per_class, qk_scale, sm_scale, dk, dv,
                           STEP, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L, SUM_LO, SUM_EARLIER,
                           ACCUMULATE, OWNED, SPLIT, ONE_LOOP, BLOCK_M, BLOCK_N, DK_PAD, DV_PAD, DOT_PREC)
            tl.debug_barrier()  # this key tile's dQ writes land before the next one reads them
    else:
        _dkdv_key_tile(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, pid_tile, b, h,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sgb, sgh, sgn, sdb, sdh, sdn,
                       n, n_heads, tiles_per_class, qk_scale, sm_scale, dk, dv,
                       STEP, IS_SUMMARY, WINDOW, BLOCK, OFFSET, SUM_C, SUM_L, SUM_LO, SUM_EARLIER,
                       ACCUMULATE, OWNED, SPLIT, ONE_LOOP, BLOCK_M, BLOCK_N, DK_PAD, DV_PAD, DOT_PREC)
