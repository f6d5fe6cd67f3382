"""The Sparse Transformer attention patterns as pure data.

A pattern answers, for a sequence length ``n`` and a head ``h``, which keys ``j`` each query ``i``
may read. Every backend consumes the same object through :meth:`Pattern.terms`: a head's key set is
a *disjoint* union of a few simple index sets (``Band``, ``Block``, ``Stride``, ``Summary``), so a
backend can compute each term with a dense kernel on a rearranged sequence and merge the terms by
log-sum-exp without counting any key twice.

Readings of the paper's ambiguities (paper-spec.md §12), all 0-based and causal (``j <= i``):

* strided local part: ``i - l < j <= i`` (``l`` keys, as OpenAI's released ``local`` mode, not the
  paper's ``l + 1``);
* strided stride part: ``(i - j) mod l == 0``;
* fixed block part: ``j // l == i // l``;
* fixed summary part, head ``h``: ``l - (v+1)·c <= j mod l < l - v·c`` with ``v = h mod num_verts``
  (exactly ``c`` cells, the released code's reading, not fairseq's ``c + 1``);
* ``part="both"`` is the union of the two parts (the paper's merged head, Eq. 7).

A query with no allowed key (a standalone fixed summary head, ``i < l - c``) has an empty row:
backends return a zero output and zero gradients for it.

Integrations (paper-spec.md §4): :func:`merged` is the union in one head (``part="both"``);
:func:`interleaved` cycles the parts over layers, the first part first (for ``fixed`` the block part
precedes the summary part, the only valid order); :func:`multihead` gives even heads the first part
and odd heads the second (for ``fixed`` the odd heads take summary offsets
``v = (h // 2) mod num_verts``).

Nothing here builds an ``n x n`` object except :meth:`Pattern.mask`, which is meant for small ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import torch

__all__ = [
    "Band",
    "Block",
    "Stride",
    "Summary",
    "Term",
    "Pattern",
    "Interleaved",
    "MultiHead",
    "dense",
    "local",
    "strided",
    "fixed",
    "merged",
    "interleaved",
    "multihead",
    "from_name",
    "PATTERN_NAMES",
]

PATTERN_NAMES = ("dense", "local", "strided", "fixed")
_PARTS = {"dense": ("both",), "local": ("both",), "strided": ("both", "local", "stride"),
          "fixed": ("both", "block", "summary")}


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


def _ceil_div(a, b):
    return -((-a) // b)


@dataclass(frozen=True)
class Band:
    """Keys ``i - window < j <= i``; ``window=None`` means every ``j <= i`` (dense causal)."""

    window: int | None

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        d = i - j
        return (d >= 0) if self.window is None else (d >= 0) & (d < self.window)

    def keys_per_query(self, i: np.ndarray) -> np.ndarray:
        return i + 1 if self.window is None else (i + 1).clip(max=self.window)

    def tiles(self, qb: torch.Tensor, kb: torch.Tensor, b: int, n: int) -> torch.Tensor:
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
    """Keys in the query's own length-``size`` block: ``j // size == i // size``, ``j <= i``."""

    size: int

    def allows(self, i, j):
        return (j <= i) & (j // self.size == i // self.size)

    def keys_per_query(self, i):
        return i % self.size + 1

    def tiles(self, qb, kb, b, n):
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

    ``min_distance=0`` includes the query itself (the standalone stride part); ``min_distance=size``
    leaves out ``j = i``, which the local band already holds when the two are merged.
    """

    size: int
    min_distance: int = 0

    def allows(self, i, j):
        d = i - j
        return (d >= self.min_distance) & (d >= 0) & (d % self.size == 0)

    def keys_per_query(self, i):
        return (i // self.size - _ceil_div(self.min_distance, self.size) + 1).clip(min=0)

    def tiles(self, qb, kb, b, n):
        dmax = torch.clamp(qb * b + b - 1, max=n - 1) - kb * b
        dmin = torch.clamp(qb * b - (kb * b + b - 1), min=max(self.min_distance, 0))
        first = _ceil_div(dmin, self.size) * self.size  # smallest multiple of size >= dmin
        return first <= dmax

    def cache_slots(self, n: int) -> None:
        return None  # each key is read again by every later query of its residue class

    def cache_keys(self, i: torch.Tensor, n: int) -> torch.Tensor:
        gap = _ceil_div(self.min_distance, self.size)  # strides between a query and its nearest key
        count = max(_ceil_div(n, self.size) - gap, 1)
        return i - self.size * (gap + torch.arange(count, device=i.device))


@dataclass(frozen=True)
class Summary:
    """Summary keys: ``lo <= j mod size < hi``, with ``j <= i``, or, with ``earlier_blocks_only``,
    ``j // size < i // size`` (the current block is then left to a :class:`Block` term)."""

    size: int
    lo: int
    hi: int
    earlier_blocks_only: bool = False

    def allows(self, i, j):
        r = j % self.size
        ok = (r >= self.lo) & (r < self.hi)
        return ok & ((j // self.size < i // self.size) if self.earlier_blocks_only else (j <= i))

    def _count_below(self, m):  # summary positions in [0, m)
        c = self.hi - self.lo
        return (m // self.size) * c + (m % self.size - self.lo).clip(0, c)

    def keys_per_query(self, i):
        m = (i // self.size) * self.size if self.earlier_blocks_only else i + 1
        return self._count_below(m)

    def tiles(self, qb, kb, b, n):
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
        return (self.hi - self.lo) * _ceil_div(n, self.size)

    def cache_slot(self, j: torch.Tensor, n: int) -> torch.Tensor:
        c, r = self.hi - self.lo, j % self.size - self.lo  # the cells of each block, in position order
        return torch.where((r >= 0) & (r < c), (j // self.size) * c + r, -1)

    def cache_keys(self, i: torch.Tensor, n: int) -> torch.Tensor:
        c = self.hi - self.lo
        t = torch.arange(self.cache_slots(n), device=i.device)
        return (t // c) * self.size + self.lo + t % c  # every summary cell in position order


Term = Union[Band, Block, Stride, Summary]


# --------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------


class _PatternBase:
    """Behaviour shared by every pattern: masks, layouts, counts and pictures from ``terms``."""

    def terms(self, head: int = 0) -> tuple[Term, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def for_layer(self, layer: int) -> "_PatternBase":
        """The pattern layer ``layer`` uses (only :class:`Interleaved` varies by layer)."""
        return self

    def head_groups(self, n_heads: int) -> list[tuple[tuple[Term, ...], list[int]]]:
        """Heads grouped by identical term lists: ``[(terms, [h, ...]), ...]`` in head order."""
        groups: dict[tuple[Term, ...], list[int]] = {}
        for h in range(n_heads):
            groups.setdefault(self.terms(h), []).append(h)
        return list(groups.items())

    def mask(self, n: int, head: int = 0) -> torch.Tensor:
        """``torch.bool [n, n]``: ``[i, j]`` is True iff query ``i`` may read key ``j``. Small n only."""
        i = torch.arange(n).view(n, 1)
        j = torch.arange(n).view(1, n)
        out = torch.zeros(n, n, dtype=torch.bool)
        for t in self.terms(head):
            out |= t.allows(i, j)
        return out

    def block_layout(self, n: int, block: int, head: int = 0) -> torch.Tensor:
        """``torch.bool [ceil(n/block), ceil(n/block)]``: True where a ``block x block`` tile of the
        score matrix holds at least one allowed pair. Closed-form arithmetic per tile."""
        nb = _ceil_div(n, block)
        qb = torch.arange(nb, dtype=torch.int64).view(nb, 1)
        kb = torch.arange(nb, dtype=torch.int64).view(1, nb)
        out = torch.zeros(nb, nb, dtype=torch.bool)
        for t in self.terms(head):
            out |= t.tiles(qb, kb, block, n)
        return out

    def keys_per_query(self, n: int, head: int = 0) -> np.ndarray:
        """``int64 [n]``: how many keys each query reads (the terms are disjoint)."""
        i = np.arange(n, dtype=np.int64)
        return sum((t.keys_per_query(i) for t in self.terms(head)), np.zeros(n, dtype=np.int64))

    def num_pairs(self, n: int, head: int = 0) -> int:
        """The number of allowed (i, j) pairs for one head (FLOP counts: 4·head_dim per pair)."""
        return int(self.keys_per_query(n, head).sum())

    def max_keys(self, n: int, head: int = 0) -> int:
        return int(self.keys_per_query(n, head).max()) if n else 0

    def ascii(self, n: int, head: int = 0) -> str:
        """The mask as text, one query per line (``x`` = allowed), as in paper-spec.md §3.3."""
        m = self.mask(n, head)
        w = len(str(n - 1))
        return "\n".join(
            f"i={i:>{w}} " + "".join("x" if a else "." for a in row.tolist()) for i, row in enumerate(m)
        )

    def picture(self, n: int, head: int = 0, block: int | None = None, max_pixels: int = 1024):
        """A PIL image of the mask (n <= max_pixels) or, for longer sequences, of the block layout
        (block size chosen so the picture is at most ``max_pixels`` wide). White = allowed."""
        from PIL import Image

        if block is None:
            block = 1 if n <= max_pixels else _ceil_div(n, max_pixels)
        grid = self.mask(n, head) if block == 1 else self.block_layout(n, block, head)
        arr = np.where(grid.numpy(), 255, 0).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
        scale = max(1, 512 // arr.shape[0])
        return img.resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST) if scale > 1 else img


@dataclass(frozen=True)
class Pattern(_PatternBase):
    """One of the paper's patterns (``dense``, ``local``, ``strided``, ``fixed``) and a part.

    Build it with :func:`dense`, :func:`local`, :func:`strided` or :func:`fixed`.
    """

    name: str
    stride: int | None = None  # l (for ``local``: the window)
    c: int | None = None
    num_verts: int = 1
    part: str = "both"

    def __post_init__(self):
        _validate(self)

    def terms(self, head: int = 0) -> tuple[Term, ...]:
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

    def with_part(self, part: str) -> "Pattern":
        return replace(self, part=part)

    @property
    def parts(self) -> tuple[str, str] | None:
        """The pattern's two factorized parts in the valid order, or None for dense/local."""
        return {"strided": ("local", "stride"), "fixed": ("block", "summary")}.get(self.name)

    def describe(self) -> str:
        args = {"dense": "", "local": f"window={self.stride}", "strided": f"stride={self.stride}, part={self.part!r}",
                "fixed": f"stride={self.stride}, c={self.c}, num_verts={self.num_verts}, part={self.part!r}"}
        return f"{self.name}({args[self.name]})"


def _validate(p: Pattern) -> None:
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
    if not isinstance(p.num_verts, int) or p.num_verts < 1:
        raise ValueError(f"fixed pattern: num_verts={p.num_verts!r} must be a positive integer")
    if p.num_verts * p.c > p.stride:
        raise ValueError(
            f"fixed pattern: num_verts*c = {p.num_verts}*{p.c} = {p.num_verts * p.c} exceeds "
            f"stride={p.stride}; use num_verts <= {p.stride // p.c}"
        )


@dataclass(frozen=True)
class Interleaved(_PatternBase):
    """Paper Eq. 6: layer ``r`` uses ``patterns[r % len(patterns)]``."""

    patterns: tuple[Pattern, ...]

    def for_layer(self, layer: int) -> Pattern:
        return self.patterns[layer % len(self.patterns)]

    def terms(self, head: int = 0):
        raise ValueError("an interleaved pattern has no single key set; call .for_layer(layer) first")

    def describe(self) -> str:
        return "interleaved(" + ", ".join(p.describe() for p in self.patterns) + ")"


@dataclass(frozen=True)
class MultiHead(_PatternBase):
    """Paper Eq. 8 with the heads split among the parts: even heads read the first part, odd heads
    the second. For ``fixed``, odd head ``h`` uses summary offset ``v = (h // 2) mod num_verts``."""

    base: Pattern

    def head_pattern(self, head: int) -> tuple[Pattern, int]:
        first, second = self.base.parts
        return self.base.with_part(second if head % 2 else first), head // 2

    def terms(self, head: int = 0):
        p, h = self.head_pattern(head)
        return p.terms(h)

    def describe(self) -> str:
        return f"multihead({self.base.describe()})"


# --------------------------------------------------------------------------------------------
# Constructors: the public API
# --------------------------------------------------------------------------------------------


def dense() -> Pattern:
    """Dense causal attention: every ``j <= i``."""
    return Pattern("dense")


def local(window: int) -> Pattern:
    """A causal band of ``window`` keys: ``i - window < j <= i``."""
    return Pattern("local", stride=window)


def strided(stride: int, part: str = "both") -> Pattern:
    """Strided attention (paper §4.3): ``part`` in ``"local"``, ``"stride"``, ``"both"``."""
    return Pattern("strided", stride=stride, part=part)


def fixed(stride: int, c: int, num_verts: int = 1, part: str = "both") -> Pattern:
    """Fixed attention (paper §4.3): ``part`` in ``"block"``, ``"summary"``, ``"both"``; head ``h``
    reads summary sub-block ``v = h mod num_verts`` counted from the end of each block."""
    return Pattern("fixed", stride=stride, c=c, num_verts=num_verts, part=part)


def _factorizable(p: Pattern, what: str) -> Pattern:
    if not isinstance(p, Pattern) or p.parts is None:
        raise ValueError(f"{what} needs a strided or fixed pattern, got {getattr(p, 'describe', lambda: p)()}")
    return p


def merged(p: Pattern) -> Pattern:
    """Paper Eq. 7: one head reads the union of both parts."""
    return _factorizable(p, "merged").with_part("both")


def interleaved(p: Pattern) -> Interleaved:
    """Paper Eq. 6: the parts alternate over layers, first part first (fixed: block, then summary)."""
    first, second = _factorizable(p, "interleaved").parts
    return Interleaved((p.with_part(first), p.with_part(second)))


def multihead(p: Pattern) -> MultiHead:
    """Paper Eq. 8: heads split among the parts (even heads first part, odd heads second)."""
    return MultiHead(_factorizable(p, "multihead").with_part("both"))


INTEGRATIONS = {"merged": merged, "interleaved": interleaved, "multihead": multihead}


def from_name(name: str, stride: int | None = None, c: int | None = None, num_verts: int = 1,
              part: str = "both", integration: str = "merged"):
    """Build a pattern from configuration values (the model config and the CLI use this)."""
    if name == "dense":
        return dense()
    if name == "local":
        return local(stride)
    if name == "strided":
        p = strided(stride, part)
    elif name == "fixed":
        p = fixed(stride, c, num_verts, part)
    else:
        raise ValueError(f"unknown pattern {name!r}; choose one of {', '.join(PATTERN_NAMES)}")
    if integration not in INTEGRATIONS:
        raise ValueError(f"unknown integration {integration!r}; choose one of {', '.join(INTEGRATIONS)}")
    if part != "both" or integration == "merged":
        return p
    return INTEGRATIONS[integration](p)
