"""The Sparse Transformer attention patterns as pure data.

A pattern answers, for a sequence length ``n`` and a head ``h``, which keys ``j`` each query ``i``
may read. Every backend consumes the same object through :meth:`Pattern.terms`: a head's key set is
a *disjoint* union of a few simple index sets (``Band``, ``Block``, ``Stride``, ``Summary``), so a
backend can compute each term with a dense kernel on a rearranged sequence and merge the terms by
log-sum-exp without counting any key twice.

This module owns every index rule: the key sets, the stride term's residue runs and gap, the
summary term's compact positions and counts, key spans, tile layouts and the ceiling division
(:func:`ceil_div`). The backends (factorized, flex, the Triton plan) and the KV cache call these
rules instead of re-deriving them; docs/design.md §3-4 shows how a pattern flows through them.

Readings of the paper's ambiguities (docs/method.md §10), all 0-based and causal (``j <= i``):

* strided local part: ``i - l < j <= i`` (``l`` keys, as OpenAI's released ``local`` mode, not the
  paper's ``l + 1``);
* strided stride part: ``(i - j) mod l == 0``;
* fixed block part: ``j // l == i // l``;
* fixed summary part, head ``h``: ``l - (v+1)·c <= j mod l < l - v·c`` with ``v = h mod num_verts``
  (exactly ``c`` cells, the released code's reading, not fairseq's ``c + 1``);
* ``part="both"`` is the union of the two parts (the paper's merged head, Eq. 7).

A query with no allowed key (a standalone fixed summary head, ``i < l - c``) has an empty row:
backends return a zero output and zero gradients for it.

Integrations (paper §5.1, docs/method.md §4): :func:`merged` is the union in one head (``part="both"``);
:func:`interleaved` cycles the parts over layers, the first part first (for ``fixed`` the block part
precedes the summary part, the only valid order); :func:`multihead` gives even heads the first part
and odd heads the second (for ``fixed`` the odd heads take summary offsets
``v = (h // 2) mod num_verts``).

Nothing here builds an ``n x n`` object except :meth:`Pattern.mask`, which is meant for small ``n``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
import torch

__all__ = [
    "INTEGRATIONS",
    "PATTERN_NAMES",
    "Band",
    "Block",
    "Interleaved",
    "MultiHead",
    "NamedPattern",
    "Pattern",
    "Stride",
    "Summary",
    "Term",
    "ceil_div",
    "dense",
    "fixed",
    "from_name",
    "interleaved",
    "local",
    "merged",
    "multihead",
    "strided",
]

PATTERN_NAMES = ("dense", "local", "strided", "fixed")
_PARTS = {
    "dense": ("both",),
    "local": ("both",),
    "strided": ("both", "local", "stride"),
    "fixed": ("both", "block", "summary"),
}


# --------------------------------------------------------------------------------------------
# Terms: the simple index sets a head's key set is built from. Each is causal (j <= i).
# --------------------------------------------------------------------------------------------
#
# Besides ``allows``, ``keys_per_query`` and ``tiles``, each term gives the KV cache of sampling
# (``kv_cache.py``) its rules, so the cache holds and reads exactly the term's keys:
#
# * ``cache_slots(n)``: the size of the term's own buffer of keys for ``n`` positions, laid out so
#   that query ``i`` reads its slots ``0 .. keys_per_query(i) - 1`` (a ring of the last keys, the
#   current block, the compacted summary cells); None when no such buffer exists (``Stride``: a query
#   reads its residue class, so every key must be kept at its position).
# * ``cache_slot(j, n)``: the slot of key ``j`` in that buffer, -1 for a key no query reads.
# * ``cache_keys(i, n)``: a fixed-length ``[K]`` tensor of positions whose first ``keys_per_query(i)``
#   entries are the keys of query ``i`` (the rest are arbitrary), for a buffer of every position.
#
# ``i`` and ``j`` are int64 tensors (``keys_per_query`` takes numpy arrays too); nothing here
# depends on their values on the host, so a decoding step built from these rules never syncs.


def ceil_div(a, b):
    """``ceil(a / b)`` for ``b > 0``: Python ints, numpy arrays or torch tensors (elementwise).

    The one ceiling division of the package: run lengths, compact lengths, gaps and tile counts
    all go through it. Example: ``ceil_div(37, 8) == 5`` (five tiles of 8 cover 37 rows).
    """
    return -((-a) // b)


def _clip(x, lo, hi):
    """``min(max(x, lo), hi)`` for ints, numpy arrays or torch tensors."""
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, lo, hi)
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi)
    return min(max(x, lo), hi)


@dataclass(frozen=True)
class Band:
    """Keys ``i - window < j <= i``; ``window=None`` means every ``j <= i`` (dense causal).

    The strided pattern's local part (paper §4.3, with ``window = l``: docs/method.md §2 says why
    ``l`` keys and not ``l + 1``) and the ``local`` and ``dense`` patterns.
    """

    window: int | None

    def allows(self, i, j):
        """Whether query ``i`` reads key ``j`` (int tensors that broadcast; bool result)."""
        d = i - j
        return (d >= 0) if self.window is None else (d >= 0) & (d < self.window)

    def keys_per_query(self, i):
        """How many keys query ``i`` reads (int, numpy array or int tensor ``i``)."""
        return i + 1 if self.window is None else _clip(i + 1, 0, self.window)

    def covers(self, n: int) -> bool:
        """Whether, at length ``n``, the band reaches every earlier position (plain causal)."""
        return self.window is None or self.window >= n

    def key_span(self, n: int, rows: int) -> int:
        """An upper bound on the keys that ``rows`` consecutive queries read together (a tile's
        key range): ``window + rows``, or ``n`` for the dense band."""
        return self.window + rows if self.window else n

    def tiles(self, qb: torch.Tensor, kb: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Whether query tile ``qb`` and key tile ``kb`` (``b x b`` tiles, length ``n``) share an
        allowed pair; ``qb``, ``kb`` are int64 tensors that broadcast."""
        dmax = torch.clamp(qb * b + b - 1, max=n - 1) - kb * b  # largest i - j in the tile
        dmin = qb * b - torch.clamp(kb * b + b - 1, max=n - 1)  # smallest i - j in the tile
        ok = dmax >= 0
        return ok if self.window is None else ok & (dmin < self.window)

    def cache_slots(self, n: int) -> int:
        return n if self.window is None else min(self.window, n)

    def cache_slot(self, j: torch.Tensor, n: int) -> torch.Tensor:
        return j % self.cache_slots(n)  # a ring of the last window keys

    def cache_keys(self, i: torch.Tensor, n: int) -> torch.Tensor:
        return i - torch.arange(self.cache_slots(n), device=i.device)  # i, i - 1, ...


@dataclass(frozen=True)
class Block:
    """Keys in the query's own length-``size`` block: ``j // size == i // size``, ``j <= i``.

    The fixed pattern's first part (paper §4.3, A1).
    """

    size: int

    def allows(self, i, j):
        """Whether query ``i`` reads key ``j`` (int tensors that broadcast; bool result)."""
        return (j <= i) & (j // self.size == i // self.size)

    def keys_per_query(self, i):
        """How many keys query ``i`` reads (int or int array ``i``)."""
        return i % self.size + 1

    def key_span(self, n: int, rows: int) -> int:
        """An upper bound on the keys that ``rows`` consecutive queries read together."""
        return self.size + rows

    def tiles(self, qb, kb, b, n):
        """Whether query tile ``qb`` and key tile ``kb`` share an allowed pair (see :meth:`Band.tiles`)."""
        l = self.size
        q_lo, q_hi = qb * b // l, torch.clamp(qb * b + b - 1, max=n - 1) // l
        k_lo, k_hi = kb * b // l, torch.clamp(kb * b + b - 1, max=n - 1) // l
        return (kb <= qb) & (torch.maximum(q_lo, k_lo) <= torch.minimum(q_hi, k_hi))

    def cache_slots(self, n: int) -> int:
        return min(self.size, n)

    def cache_slot(self, j: torch.Tensor, n: int) -> torch.Tensor:
        return j % self.size  # the current block overwrites the previous one

    def cache_keys(self, i: torch.Tensor, n: int) -> torch.Tensor:
        return (i // self.size) * self.size + torch.arange(self.cache_slots(n), device=i.device)


@dataclass(frozen=True)
class Stride:
    """Keys ``j = i - m·size`` for whole ``m`` with ``m·size >= min_distance`` (and ``j >= 0``).

    The strided pattern's second part (paper §4.3, A2). ``min_distance=0`` includes the query
    itself (the standalone stride part); ``min_distance=size`` leaves out ``j = i``, which the local
    band already holds when the two are merged.

    Backends compute it on *residue runs* (paper §5.5: transpose, then a local window): the sequence
    padded to ``size·run_length(n)`` and viewed as ``[run_length(n), size]`` then transposed, so the
    positions ``r, r + size, r + 2·size, ...`` of residue class ``r`` are one contiguous run, row
    ``t`` of run ``r`` is position ``t·size + r``, and the term is causal attention inside each run
    with query and key rows at least :attr:`gap` apart.
    """

    size: int
    min_distance: int = 0

    @property
    def gap(self) -> int:
        """The fewest rows of a residue run between a query and a key it reads:
        ``ceil(min_distance / size)`` (0: the query reads itself; 1: merged with a band)."""
        return max(ceil_div(self.min_distance, self.size), 0)

    def run_length(self, n: int) -> int:
        """Rows of the longest residue run at length ``n``: ``ceil(n / size)`` (every run is padded
        to it; class ``r`` has ``ceil((n - r) / size)`` real rows)."""
        return ceil_div(n, self.size)

    def run_allows(self, query_row, key_row):
        """Whether a query reads a key of its own residue run, from their rows in the run (int
        tensors that broadcast; bool result): ``query_row - key_row >= gap``."""
        return (query_row - key_row) >= self.gap

    def allows(self, i, j):
        """Whether query ``i`` reads key ``j`` (int tensors that broadcast; bool result)."""
        d = i - j
        return (d >= self.min_distance) & (d >= 0) & (d % self.size == 0)

    def keys_per_query(self, i):
        """How many keys query ``i`` reads (int, numpy array or int tensor ``i``): its run's rows
        ``<= i // size`` at least :attr:`gap` rows back."""
        rows = i // self.size - self.gap + 1
        return rows.clip(min=0) if hasattr(rows, "clip") else max(rows, 0)

    def key_span(self, n: int, rows: int) -> int:
        """An upper bound on the keys ``rows`` consecutive rows of one residue run read: the run."""
        return self.run_length(n)

    def tiles(self, qb, kb, b, n):
        """Whether query tile ``qb`` and key tile ``kb`` share an allowed pair (see :meth:`Band.tiles`)."""
        dmax = torch.clamp(qb * b + b - 1, max=n - 1) - kb * b
        dmin = torch.clamp(qb * b - (kb * b + b - 1), min=max(self.min_distance, 0))
        first = ceil_div(dmin, self.size) * self.size  # smallest multiple of size >= dmin
        return first <= dmax

    def cache_slots(self, n: int) -> None:
        return None  # each key is read again by every later query of its residue class

    def cache_keys(self, i: torch.Tensor, n: int) -> torch.Tensor:
        count = max(self.run_length(n) - self.gap, 1)  # rows a query can read back in its run
        return i - self.size * (self.gap + torch.arange(count, device=i.device))


@dataclass(frozen=True)
class Summary:
    """Summary keys: ``lo <= j mod size < hi``, with ``j <= i``, or, with ``earlier_blocks_only``,
    ``j // size < i // size`` (the current block is then left to a :class:`Block` term).

    The fixed pattern's second part (paper §4.3, A2: ``c = hi - lo`` summary cells per block).
    Backends and the KV cache read it through *compact* coordinates: the :attr:`cells` summary
    cells of every block, in position order, so compact key ``s`` is position :meth:`position`
    ``(s)`` and the keys one query reads are a prefix of the compact sequence.
    """

    size: int
    lo: int
    hi: int
    earlier_blocks_only: bool = False

    @property
    def cells(self) -> int:
        """Summary cells per block, ``c = hi - lo``."""
        return self.hi - self.lo

    def compact_length(self, n: int) -> int:
        """Compact keys of a length-``n`` sequence padded to whole blocks: ``c·ceil(n / size)``."""
        return self.cells * ceil_div(n, self.size)

    def count_below(self, m):
        """Summary positions in ``[0, m)``, i.e. compact keys before position ``m`` (int, numpy
        array or tensor ``m >= 0``). ``count_below(n)`` is the number of real compact keys."""
        return (m // self.size) * self.cells + _clip(m % self.size - self.lo, 0, self.cells)

    def position(self, s):
        """Sequence position of compact key ``s`` (int or int tensor): ``(s // c)·size + lo + s % c``."""
        c = self.cells
        return (s // c) * self.size + self.lo + s % c

    def slot(self, pos: int) -> int | None:
        """The compact index of position ``pos``, or None when ``pos`` is no summary cell (the
        inverse of :meth:`position`)."""
        r = pos % self.size - self.lo
        return (pos // self.size) * self.cells + r if 0 <= r < self.cells else None

    def allows_compact(self, i, s):
        """Whether query ``i`` reads compact key ``s`` (int tensors that broadcast; bool result)."""
        if self.earlier_blocks_only:
            return s // self.cells < i // self.size
        return self.position(s) <= i

    def allows(self, i, j):
        """Whether query ``i`` reads key ``j`` (int tensors that broadcast; bool result)."""
        r = j % self.size
        ok = (r >= self.lo) & (r < self.hi)
        return ok & ((j // self.size < i // self.size) if self.earlier_blocks_only else (j <= i))

    def keys_per_query(self, i):
        """How many keys query ``i`` reads (int or int array ``i``): a prefix of the compact keys."""
        m = (i // self.size) * self.size if self.earlier_blocks_only else i + 1
        return self.count_below(m)

    def key_span(self, n: int, rows: int) -> int:
        """An upper bound on the compact keys any queries read: every real one."""
        return self.count_below(n)

    def tiles(self, qb, kb, b, n):
        """Whether query tile ``qb`` and key tile ``kb`` share an allowed pair (see :meth:`Band.tiles`)."""
        l = self.size
        k0 = kb * b
        # smallest summary position >= k0
        base = (k0 // l) * l
        r0 = k0 - base
        j_min = torch.where(r0 < self.hi, base + torch.clamp(r0, min=self.lo), base + l + self.lo)
        k_end = torch.clamp(k0 + b - 1, max=n - 1)
        i_max = torch.clamp(qb * b + b - 1, max=n - 1)
        reach = (j_min // l < i_max // l) if self.earlier_blocks_only else (j_min <= i_max)
        return (j_min <= k_end) & reach

    def cache_slots(self, n: int) -> int:
        return self.compact_length(n)

    def cache_slot(self, j: torch.Tensor, n: int) -> torch.Tensor:
        r = j % self.size - self.lo  # the tensor form of :meth:`slot`, -1 for no summary cell
        return torch.where((r >= 0) & (r < self.cells), (j // self.size) * self.cells + r, -1)

    def cache_keys(self, i: torch.Tensor, n: int) -> torch.Tensor:
        return self.position(torch.arange(self.cache_slots(n), device=i.device))  # every cell, in order


Term = Band | Block | Stride | Summary


# --------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------


class Pattern(ABC):
    """Any attention pattern: the type every backend, the model and the KV cache take.

    A pattern is defined by :meth:`terms` alone: head ``h`` reads the disjoint union of the index
    sets ``terms(h)``. Masks, block layouts, key counts and pictures all follow from the terms, and
    so do the backends (docs/design.md §3), so a subclass that returns other terms is a new pattern
    every backend computes. The paper's patterns are :class:`NamedPattern`; :class:`Interleaved`
    and :class:`MultiHead` are two of its integrations (paper §5.1).
    """

    @abstractmethod
    def terms(self, head: int = 0) -> tuple[Term, ...]:
        """The disjoint index sets head ``head`` reads. Raises ValueError for a pattern that varies
        by layer (resolve it with :meth:`for_layer` first)."""

    @abstractmethod
    def describe(self) -> str:
        """The pattern as the call that builds it, e.g. ``fixed(stride=128, c=32, ...)``."""

    def for_layer(self, layer: int) -> Pattern:
        """The pattern layer ``layer`` uses (only :class:`Interleaved` varies by layer)."""
        return self

    def head_groups(self, n_heads: int) -> list[tuple[tuple[Term, ...], list[int]]]:
        """Heads grouped by identical term lists: ``[(terms, [h, ...]), ...]`` in head order."""
        groups: dict[tuple[Term, ...], list[int]] = {}
        for h in range(n_heads):
            groups.setdefault(self.terms(h), []).append(h)
        return list(groups.items())

    def mask(self, n: int, head: int = 0) -> torch.Tensor:
        """``torch.bool [n, n]``: ``[i, j]`` is True iff query ``i`` may read key ``j``. Small n only.
        Raises ValueError unless ``n`` is an integer >= 0."""
        _check_int("n", n, 0)
        i = torch.arange(n).view(n, 1)
        j = torch.arange(n).view(1, n)
        out = torch.zeros(n, n, dtype=torch.bool)
        for t in self.terms(head):
            out |= t.allows(i, j)
        return out

    def block_layout(self, n: int, block: int, head: int = 0) -> torch.Tensor:
        """``torch.bool [ceil(n/block), ceil(n/block)]``: True where a ``block x block`` tile of the
        score matrix holds at least one allowed pair. Closed-form arithmetic per tile. Raises
        ValueError unless ``n >= 0`` and ``block >= 1`` are integers."""
        _check_int("n", n, 0)
        _check_int("block", block, 1)
        nb = ceil_div(n, block)
        qb = torch.arange(nb, dtype=torch.int64).view(nb, 1)
        kb = torch.arange(nb, dtype=torch.int64).view(1, nb)
        out = torch.zeros(nb, nb, dtype=torch.bool)
        for t in self.terms(head):
            out |= t.tiles(qb, kb, block, n)
        return out

    def keys_per_query(self, n: int, head: int = 0) -> np.ndarray:
        """``int64 [n]``: how many keys each query reads (the terms are disjoint). Raises ValueError
        unless ``n`` is an integer >= 0."""
        _check_int("n", n, 0)
        i = np.arange(n, dtype=np.int64)
        return sum((t.keys_per_query(i) for t in self.terms(head)), np.zeros(n, dtype=np.int64))

    def num_pairs(self, n: int, head: int = 0) -> int:
        """The number of allowed (i, j) pairs for one head (FLOP counts: 4·head_dim per pair)."""
        return int(self.keys_per_query(n, head).sum())

    def max_keys(self, n: int, head: int = 0) -> int:
        """The most keys any query reads at length ``n`` (0 for ``n = 0``)."""
        return int(self.keys_per_query(n, head).max()) if n else 0

    def ascii(self, n: int, head: int = 0) -> str:
        """The mask as text, one query per line (``x`` = allowed), as in docs/method.md §2."""
        m = self.mask(n, head)
        w = len(str(n - 1))
        return "\n".join(f"i={i:>{w}} " + "".join("x" if a else "." for a in row.tolist()) for i, row in enumerate(m))

    def picture(self, n: int, head: int = 0, block: int | None = None, max_pixels: int = 1024):
        """A PIL image of the mask (n <= max_pixels) or, for longer sequences, of the block layout
        (block size chosen so the picture is at most ``max_pixels`` wide). White = allowed."""
        from PIL import Image

        if block is None:
            block = 1 if n <= max_pixels else ceil_div(n, max_pixels)
        grid = self.mask(n, head) if block == 1 else self.block_layout(n, block, head)
        arr = np.where(grid.numpy(), 255, 0).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
        scale = max(1, 512 // arr.shape[0])
        return img.resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST) if scale > 1 else img


@dataclass(frozen=True)
class NamedPattern(Pattern):
    """One of the paper's patterns (``dense``, ``local``, ``strided``, ``fixed``) and a part.

    Build it with :func:`dense`, :func:`local`, :func:`strided` or :func:`fixed` (paper §4.3; the
    exact index sets are in docs/method.md §2-3).
    """

    name: str
    stride: int | None = None  # l (for ``local``: the window)
    c: int | None = None
    num_verts: int = 1
    part: str = "both"

    def __post_init__(self):
        _validate(self)

    def terms(self, head: int = 0) -> tuple[Term, ...]:
        """The terms of head ``head``: fixed heads take summary offset ``v = head mod num_verts``."""
        l = self.stride
        if self.name == "dense":
            return (Band(None),)
        if self.name == "local":
            return (Band(l),)
        if self.name == "strided":
            if self.part == "local":
                return (Band(l),)
            if self.part == "stride":
                return (Stride(l, 0),)
            return (Band(l), Stride(l, l))
        # fixed
        v = head % self.num_verts
        lo, hi = l - (v + 1) * self.c, l - v * self.c
        if self.part == "block":
            return (Block(l),)
        if self.part == "summary":
            return (Summary(l, lo, hi, False),)
        return (Block(l), Summary(l, lo, hi, True))

    def with_part(self, part: str) -> NamedPattern:
        """The same pattern restricted to ``part`` (one of :attr:`parts`, or ``"both"``)."""
        return replace(self, part=part)

    @property
    def parts(self) -> tuple[str, str] | None:
        """The pattern's two factorized parts in the valid order, or None for dense/local."""
        return {"strided": ("local", "stride"), "fixed": ("block", "summary")}.get(self.name)

    def describe(self) -> str:
        """The pattern as the call that builds it, e.g. ``strided(stride=128, part='both')``."""
        args = {
            "dense": "",
            "local": f"window={self.stride}",
            "strided": f"stride={self.stride}, part={self.part!r}",
            "fixed": f"stride={self.stride}, c={self.c}, num_verts={self.num_verts}, part={self.part!r}",
        }
        return f"{self.name}({args[self.name]})"


def _check_int(name: str, value, least: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (numpy ints included, bool not) ``>= least``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}={value!r} must be an integer >= {least}")


def _validate(p: NamedPattern) -> None:
    if p.name not in PATTERN_NAMES:
        raise ValueError(f"unknown pattern {p.name!r}; choose one of {', '.join(PATTERN_NAMES)}")
    if p.part not in _PARTS[p.name]:
        raise ValueError(f"{p.name} pattern: part={p.part!r} is not one of {', '.join(_PARTS[p.name])}")
    if p.name == "dense":
        return
    what = "window" if p.name == "local" else "stride"
    if not isinstance(p.stride, int) or isinstance(p.stride, bool) or p.stride <= 0:
        raise ValueError(f"{p.name} pattern: {what}={p.stride!r} must be a positive integer (e.g. {what}=128)")
    if p.name != "fixed":
        return
    if not isinstance(p.c, int) or isinstance(p.c, bool) or p.c <= 0:
        raise ValueError(f"fixed pattern: c={p.c!r} must be a positive integer <= stride (e.g. c=32)")
    if p.c > p.stride:
        raise ValueError(f"fixed pattern: c={p.c} is larger than stride={p.stride}; use c <= stride")
    if not isinstance(p.num_verts, int) or isinstance(p.num_verts, bool) or p.num_verts < 1:
        raise ValueError(f"fixed pattern: num_verts={p.num_verts!r} must be a positive integer")
    if p.num_verts * p.c > p.stride:
        raise ValueError(
            f"fixed pattern: num_verts*c = {p.num_verts}*{p.c} = {p.num_verts * p.c} exceeds "
            f"stride={p.stride}; use num_verts <= {p.stride // p.c}"
        )


@dataclass(frozen=True)
class Interleaved(Pattern):
    """Paper Eq. 6: layer ``r`` uses ``patterns[r % len(patterns)]``."""

    patterns: tuple[NamedPattern, ...]

    def for_layer(self, layer: int) -> NamedPattern:
        """The pattern of layer ``layer``: ``patterns[layer % len(patterns)]``."""
        return self.patterns[layer % len(self.patterns)]

    def terms(self, head: int = 0):
        """Raises ValueError: the key set depends on the layer; call :meth:`for_layer` first."""
        raise ValueError("an interleaved pattern has no single key set; call .for_layer(layer) first")

    def describe(self) -> str:
        """``interleaved(first, second)`` of the two parts' descriptions."""
        return "interleaved(" + ", ".join(p.describe() for p in self.patterns) + ")"


@dataclass(frozen=True)
class MultiHead(Pattern):
    """Paper Eq. 8 with the heads split among the parts: even heads read the first part, odd heads
    the second. For ``fixed``, odd head ``h`` uses summary offset ``v = (h // 2) mod num_verts``."""

    base: NamedPattern

    def head_pattern(self, head: int) -> tuple[NamedPattern, int]:
        """The part head ``head`` reads and the head index it uses inside that part (``head // 2``)."""
        first, second = self.base.parts
        return self.base.with_part(second if head % 2 else first), head // 2

    def terms(self, head: int = 0):
        """The terms of head ``head``'s part (see :meth:`head_pattern`)."""
        p, h = self.head_pattern(head)
        return p.terms(h)

    def describe(self) -> str:
        """``multihead(base)``."""
        return f"multihead({self.base.describe()})"


# --------------------------------------------------------------------------------------------
# Constructors: the public API
# --------------------------------------------------------------------------------------------


def dense() -> NamedPattern:
    """Dense causal attention: every ``j <= i`` (the paper's baseline, §4.2)."""
    return NamedPattern("dense")


def local(window: int) -> NamedPattern:
    """A causal band of ``window`` keys: ``i - window < j <= i``. Raises ValueError unless
    ``window`` is a positive int."""
    return NamedPattern("local", stride=window)


def strided(stride: int, part: str = "both") -> NamedPattern:
    """Strided attention (paper §4.3): ``part`` in ``"local"``, ``"stride"``, ``"both"``. Raises
    ValueError for a non-positive stride or an unknown part."""
    return NamedPattern("strided", stride=stride, part=part)


def fixed(stride: int, c: int, num_verts: int = 1, part: str = "both") -> NamedPattern:
    """Fixed attention (paper §4.3): ``part`` in ``"block"``, ``"summary"``, ``"both"``; head ``h``
    reads summary sub-block ``v = h mod num_verts`` counted from the end of each block. Raises
    ValueError unless ``0 < c``, ``num_verts·c <= stride``."""
    return NamedPattern("fixed", stride=stride, c=c, num_verts=num_verts, part=part)


def _factorizable(p: Pattern, what: str) -> NamedPattern:
    if not isinstance(p, NamedPattern) or p.parts is None:
        raise ValueError(f"{what} needs a strided or fixed pattern, got {getattr(p, 'describe', lambda: p)()}")
    return p


def merged(p: NamedPattern) -> NamedPattern:
    """Paper Eq. 7: one head reads the union of both parts. Raises ValueError for dense/local."""
    return _factorizable(p, "merged").with_part("both")


def interleaved(p: NamedPattern) -> Interleaved:
    """Paper Eq. 6: the parts alternate over layers, first part first (fixed: block, then summary).
    Raises ValueError for dense/local."""
    first, second = _factorizable(p, "interleaved").parts
    return Interleaved((p.with_part(first), p.with_part(second)))


def multihead(p: NamedPattern) -> MultiHead:
    """Paper Eq. 8: heads split among the parts (even heads first part, odd heads second). Raises
    ValueError for dense/local."""
    return MultiHead(_factorizable(p, "multihead").with_part("both"))


INTEGRATIONS = {"merged": merged, "interleaved": interleaved, "multihead": multihead}


def from_name(
    name: str,
    stride: int | None = None,
    c: int | None = None,
    num_verts: int = 1,
    part: str = "both",
    integration: str = "merged",
) -> Pattern:
    """Build a pattern from configuration values (the model config and the CLI use this).

    ``integration`` (paper §5.1) combines the two parts of a strided or fixed pattern, so it takes
    ``part="both"``: ``interleaved`` or ``multihead`` with a single part, or with ``dense`` or
    ``local`` (which have no parts), raises ValueError instead of silently building something else.
    ``merged`` with a single part is that part in every head and layer.

    Raises:
        ValueError: an unknown name, part or integration, bad parameters, or an integration that
            does not apply (see above).
    """
    if name not in PATTERN_NAMES:
        raise ValueError(f"unknown pattern {name!r}; choose one of {', '.join(PATTERN_NAMES)}")
    if integration not in INTEGRATIONS:
        raise ValueError(f"unknown integration {integration!r}; choose one of {', '.join(INTEGRATIONS)}")
    if name in ("dense", "local"):
        if part != "both":
            raise ValueError(f"{name} pattern: part={part!r}; it has no parts, use part='both'")
        if integration != "merged":
            raise ValueError(
                f"{name} pattern: integration={integration!r} needs a strided or fixed pattern; "
                "use integration='merged'"
            )
        return dense() if name == "dense" else local(stride)
    p = strided(stride, part) if name == "strided" else fixed(stride, c, num_verts, part)
    if integration == "merged":
        return p
    if part != "both":
        raise ValueError(
            f"{name} pattern: integration={integration!r} combines both parts, but part={part!r} "
            "keeps one; use part='both' (or integration='merged' for the single part)"
        )
    return INTEGRATIONS[integration](p)
