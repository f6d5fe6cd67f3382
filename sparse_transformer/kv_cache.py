"""A sparse KV cache for incremental decoding: each layer keeps only the keys its pattern reads.

Sampling decodes one position at a time. The query at position ``i`` of head ``h`` reads the keys of
``pattern.terms(h)``, a disjoint union of simple index sets; each term gets its own pre-allocated
buffer laid out so that the keys one query reads are one contiguous slice (no gather, no mask):

    term             layout (per batch row and head)          memory (keys)   read per token
    Band(w)          ring buffer, slot i mod w                min(w, n)       min(i+1, w)
    Band(None)       every position (dense causal)            n               i + 1
    Stride(l, md)    [l, n/l], key i at (i mod l, i // l)     n               one row, <= n/l
    Block(l)         the current block, slot i mod l          l               i mod l + 1
    Summary(l, ...)  the c summary cells of each block        c·n/l           <= c·n/l

So strided reads ``l + n/l`` keys per token and fixed ``l + c·n/l`` (O(sqrt(n)) for ``l ~ sqrt(n)``
and constant ``c``); fixed also *stores* only ``l + c·n/l`` keys per head. Strided's stride term has
to keep every key, since each position is read again by every later query of its residue class.

A head's terms are combined with one softmax over the concatenated scores (the terms are disjoint,
so this is exact and equals the log-sum-exp merge of ``attention/factorized.py``). Heads with
different terms (multi-head integration, per-head summary offsets) are computed group by group.
Queries and keys are fp32 (paper-spec.md §10: fp16 q·k can overflow when sampling); values keep the
model's dtype. Every index is a Python int known on the host, so decoding never syncs with the GPU.
"""

from __future__ import annotations

import math

import torch

from .patterns import Band, Block, Stride, Summary, Term, _PatternBase

__all__ = ["KVCache", "LayerKVCache"]


class _TermCache:
    """Pre-allocated keys ``[B, H, *slots, dk]`` (fp32) and values ``[B, H, *slots, dv]`` of one term."""

    def __init__(self, slots: tuple[int, ...], batch: int, heads: int, dk: int, dv: int, device, dtype):
        self.k = torch.zeros(batch, heads, *slots, dk, device=device, dtype=torch.float32)
        self.v = torch.zeros(batch, heads, *slots, dv, device=device, dtype=dtype)

    @property
    def slots(self) -> int:
        """Keys held per batch row and head."""
        return math.prod(self.k.shape[2:-1])

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class BandCache(_TermCache):
    """``Band(w)``: a ring buffer of the last ``w`` keys (``Band(None)``, dense: all ``n``)."""

    def __init__(self, term: Band, n: int, *args):
        self.size = n if term.window is None else min(term.window, n)
        super().__init__((self.size,), *args)

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        self.k[:, :, pos % self.size] = k
        self.v[:, :, pos % self.size] = v

    def read(self, pos: int):
        m = min(pos + 1, self.size)  # slots 0..m-1 hold exactly positions max(0, pos-w+1)..pos
        return self.k[:, :, :m], self.v[:, :, :m]


class StrideCache(_TermCache):
    """``Stride(l, md)``: every key, at ``[pos mod l, pos // l]``; a query reads its residue row."""

    def __init__(self, term: Stride, n: int, *args):
        self.l = term.size
        self.gap = -(-term.min_distance // self.l)  # rows between a query and its nearest key
        super().__init__((min(self.l, n), -(-n // self.l)), *args)

    def write(self, k, v, pos):
        self.k[:, :, pos % self.l, pos // self.l] = k
        self.v[:, :, pos % self.l, pos // self.l] = v

    def read(self, pos):
        m = max(pos // self.l - self.gap + 1, 0)
        return self.k[:, :, pos % self.l, :m], self.v[:, :, pos % self.l, :m]


class BlockCache(_TermCache):
    """``Block(l)``: the current block only; slot ``pos mod l`` (older blocks are overwritten)."""

    def __init__(self, term: Block, n: int, *args):
        self.l = term.size
        super().__init__((min(self.l, n),), *args)

    def write(self, k, v, pos):
        self.k[:, :, pos % self.l] = k
        self.v[:, :, pos % self.l] = v

    def read(self, pos):
        return self.k[:, :, : pos % self.l + 1], self.v[:, :, : pos % self.l + 1]


class SummaryCache(_TermCache):
    """``Summary(l, lo, hi)``: the ``c = hi - lo`` summary cells of each block, compacted to
    ``c·ceil(n/l)`` slots in position order, so the cells a query reads are a prefix."""

    def __init__(self, term: Summary, n: int, *args):
        self.l, self.lo, self.c = term.size, term.lo, term.hi - term.lo
        self.earlier_blocks_only = term.earlier_blocks_only
        super().__init__((self.c * -(-n // self.l),), *args)

    def write(self, k, v, pos):
        r = pos % self.l - self.lo
        if 0 <= r < self.c:
            slot = (pos // self.l) * self.c + r
            self.k[:, :, slot] = k
            self.v[:, :, slot] = v

    def read(self, pos):
        m = (pos // self.l) * self.c
        if not self.earlier_blocks_only:  # the current block's cells up to pos
            m += min(max(pos % self.l - self.lo + 1, 0), self.c)
        return self.k[:, :, :m], self.v[:, :, :m]


_CACHES = {Band: BandCache, Stride: StrideCache, Block: BlockCache, Summary: SummaryCache}


def _term_cache(term: Term, n: int, *args) -> _TermCache:
    return _CACHES[type(term)](term, n, *args)


class LayerKVCache:
    """The cache of one attention layer: per group of heads with identical terms, one buffer per term.

    Args:
        pattern: the layer's pattern (``pattern.for_layer(r)`` already applied).
        n_head, batch: heads and batch rows.
        length: positions to hold (at most the model's ``n_ctx``).
        dk, dv: per-head query/key and value widths.
        dtype: the values' dtype (keys are always fp32).
    """

    def __init__(
        self,
        pattern: _PatternBase,
        n_head: int,
        batch: int,
        length: int,
        dk: int,
        dv: int,
        device=None,
        dtype=torch.float32,
    ):
        self.length = length
        self.dv = dv
        self.groups = []  # (head index tensor or None for all heads, [term caches])
        groups = pattern.head_groups(n_head)
        for terms, heads in groups:
            idx = None if len(groups) == 1 else torch.tensor(heads, device=device)
            caches = [_term_cache(t, length, batch, len(heads), dk, dv, device, dtype) for t in terms]
            self.groups.append((idx, caches))
        order = [h for _, heads in groups for h in heads]
        self.inverse = None if order == list(range(n_head)) else torch.tensor(order, device=device).argsort()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, caches in self.groups for c in caches)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
        """Store the new key/value at ``pos`` and attend to the keys the pattern allows.

        Args:
            q, k: ``[B, H, 1, dk]``; v: ``[B, H, 1, dv]`` (the projections of position ``pos``).
            pos: the position, ``0 <= pos < length``; positions must be decoded in order.
        Returns:
            ``[B, H, 1, dv]`` in ``v.dtype``; a head with no allowed key gives zeros.
        """
        if not 0 <= pos < self.length:
            raise ValueError(f"position {pos} is outside the cache (length {self.length}); make a longer cache")
        scale = q.shape[-1] ** -0.5
        q, k = q.float(), k.float()
        outs = []
        for idx, caches in self.groups:
            qg, kg, vg = (q, k, v) if idx is None else (t.index_select(1, idx) for t in (q, k, v))
            for c in caches:
                c.write(kg[:, :, 0], vg[:, :, 0], pos)
            parts = [kv for kv in (c.read(pos) for c in caches) if kv[0].shape[2] > 0]
            if not parts:  # e.g. a standalone summary head before the first summary cell
                outs.append(torch.zeros_like(vg))
                continue
            # The terms are disjoint: one softmax over their concatenated scores is the exact union.
            scores = torch.cat([torch.matmul(qg, ks.transpose(-1, -2)) for ks, _ in parts], dim=-1) * scale
            p = torch.softmax(scores, dim=-1)
            sizes = [ks.shape[2] for ks, _ in parts]
            y = sum(torch.matmul(pt.to(vs.dtype), vs) for pt, (_, vs) in zip(p.split(sizes, dim=-1), parts))
            outs.append(y)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out if self.inverse is None else out.index_select(1, self.inverse)


class KVCache:
    """One :class:`LayerKVCache` per layer, for ``batch`` sequences of up to ``length`` positions.

    Build it with :meth:`sparse_transformer.model.SparseTransformer.new_cache`.
    """

    def __init__(self, layers: list[LayerKVCache], batch: int, length: int, dense_nbytes: int):
        self.layers = layers
        self.batch = batch
        self.length = length
        self.dense_nbytes = dense_nbytes  # what a dense KV cache in the same dtypes would take

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, all layers."""
        return sum(layer.nbytes for layer in self.layers)
