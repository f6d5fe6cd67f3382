"""A sparse KV cache for sampling: each layer keeps only the keys its pattern reads, in buffers of
fixed shape, and one decoding step is a fixed sequence of tensor operations (paper §4.2-4.3, §5).

Sampling decodes one position at a time. The query at position ``i`` of head ``h`` reads the keys of
``pattern.terms(h)``, a disjoint union of simple index sets. Heads with the same terms form a group
with one key buffer and one value buffer, in one of two layouts chosen from the terms' own cache
rules (``Term.cache_slots``, ``cache_slot``, ``cache_keys`` in ``patterns.py``):

* compact: the terms' own buffers side by side (a ring of the last ``w`` keys for ``Band(w)``, the
  current block for ``Block(l)``, the ``c`` cells of every block for ``Summary``) and, when a term
  skips some keys, one spare slot that receives them. Query ``i`` reads each term's slots
  ``0 .. keys_per_query(i) - 1``; a step reads the whole buffer and masks the other slots.
* every position: slot ``j`` holds key ``j``, used when a term has no compact buffer (``Stride``,
  whose keys are read again by every later query of their residue class) or when the compact
  buffers would not be smaller. A step gathers each term's ``cache_keys(i)``, a fixed number of
  positions, and masks those past ``keys_per_query(i)``. The local band of the strided pattern
  reads the last ``l`` positions of this same buffer, so strided keeps exactly ``n`` keys per head.

    pattern (l ~ sqrt(n))   layout              keys kept per head    keys read per token
    dense                   compact (ring of n)  n                     n (masked to i + 1)
    local(w)                compact              w                     w
    strided                 every position       n                     l + n/l
    fixed                   compact              l + c·⌈n/l⌉ + 1       l + c·⌈n/l⌉ + 1

The groups of a layer share two flat buffers (keys ``[rows, dk]``, values ``[rows, dv]``), each
group's rows viewed as its own ``[B·Hg, slots, d]`` buffer. A step attends with all heads of a layer
at once: every head reads the same number ``S`` of rows (the most any group reads; fewer are padded
and masked), so a layer does one scatter of its new keys and values, one gather, one scores product,
one softmax and one product with the values, in head order (no concatenation, no reordering).
The row indices are computed once per step for all layers with the same groups (:class:`_Plan`).

No buffer holds more than a dense cache. The position is an int64 device tensor: the slots a step
writes and reads, and its masks, are computed from it on the device (once per step, shared by all
layers of the same layout), so a step allocates no memory on the host, never syncs, and keeps every
shape fixed: the whole step can be captured in a CUDA graph and replayed (``sample.py``).

A head's terms are combined with one softmax over their concatenated scores (the terms are
disjoint, so this equals the log-sum-exp merge of the training backends). Keys are stored in the
model's dtype, except fp16 keys, stored in fp32 (fp16 q·k can overflow when sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .patterns import Pattern, Term

__all__ = ["KVCache", "KVStep", "LayerKVCache", "LayerStep", "key_dtype"]


def key_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype keys are cached in for a model of ``dtype``: fp32 for fp16 models, else ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


@dataclass
class StepIndex:
    """Where one layout writes and reads at one decoding step (device tensors, fixed shapes).

    ``write [T]``: the slot of the new key per term (every position: ``[1]``); ``read [S]``: the
    slots gathered for the query, or None when it reads the whole buffer; ``bias [S]``: 0 for the
    read slots the query attends to, -inf for the others (in the keys' dtype).
    """

    write: torch.Tensor
    read: torch.Tensor | None
    bias: torch.Tensor


class _Layout:
    """Where the keys of a group of heads live, from its terms' cache rules, for ``n`` positions.

    Computes, for a position tensor, the slots a step writes and reads (:class:`StepIndex`); layers
    whose groups share terms share one ``_Layout`` and so one index computation per step.
    """

    def __init__(self, terms: tuple[Term, ...], n: int, device, dtype):
        self.terms, self.n, self.device, self.dtype = terms, n, device, dtype
        j = torch.arange(n)
        sizes = [t.cache_slots(n) for t in terms]
        self.compact = all(s is not None for s in sizes)
        if self.compact:
            self.spare = any(bool((t.cache_slot(j, n) < 0).any()) for t in terms)
            self.compact = sum(sizes) + self.spare <= n
        if self.compact:
            self.slots = sum(sizes) + self.spare
        else:  # every position; each term reads a fixed number of positions from it
            self.spare = False
            self.slots = n
            sizes = [t.cache_keys(j[:1], n).numel() for t in terms]
        self.offsets = [sum(sizes[:k]) for k in range(len(terms))]
        self.reads = self.slots if self.compact else sum(sizes)  # slots a query reads
        self.writes = len(terms) if self.compact else 1  # slots a step writes
        # slot s of a read belongs to term segment[s] at index local[s] within it; the spare slot
        # gets a segment of its own with a count of 0 keys
        segment = torch.cat(
            [torch.full((s,), k) for k, s in enumerate(sizes)] + [torch.full((int(self.spare),), len(terms))]
        )
        self.segment = segment.to(device)
        self.local = torch.cat([torch.arange(s) for s in sizes] + [torch.zeros(int(self.spare), dtype=torch.long)]).to(
            device
        )
        self.write_offsets = torch.tensor(self.offsets, device=device)
        self.no_keys = bool((sum(t.keys_per_query(j) for t in terms) == 0).any())  # e.g. summary heads before a cell
        self._prefill = {}

    def step(self, pos: torch.Tensor) -> StepIndex:
        """The slots of position ``pos`` (``[1]`` int64 on the device): what to write and read."""
        counts = [t.keys_per_query(pos) for t in self.terms]
        if self.spare:
            counts.append(torch.zeros_like(pos))
        masked = self.local >= torch.cat(counts).index_select(0, self.segment)
        bias = torch.zeros((), dtype=self.dtype, device=pos.device).masked_fill(masked, float("-inf"))
        if not self.compact:
            read = torch.cat([t.cache_keys(pos, self.n) for t in self.terms]).clamp_(0, self.n - 1)
            return StepIndex(pos, read, bias)
        slots = torch.cat([t.cache_slot(pos, self.n) for t in self.terms])
        write = slots + self.write_offsets
        if self.spare:  # keys a term skips go to the spare slot (never read)
            write = torch.where(slots < 0, self.slots - 1, write)
        return StepIndex(write, None, bias)

    def prefill(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions [M], slots [M])``: where positions ``0 .. length-1`` go so that the buffer
        holds what it would after decoding them one by one (each slot gets its last position)."""
        if length not in self._prefill:
            j = torch.arange(length)
            if not self.compact:
                src, dst = j, j
            else:
                src, dst = [], []
                for t, off, size in zip(self.terms, self.offsets, [t.cache_slots(self.n) for t in self.terms]):
                    s = t.cache_slot(j, self.n)
                    keep = s >= 0
                    last = torch.full((size,), -1).scatter_reduce_(0, s[keep], j[keep], "amax")
                    filled = (last >= 0).nonzero().view(-1)
                    src.append(last[filled])
                    dst.append(filled + off)
                src, dst = torch.cat(src), torch.cat(dst)
            self._prefill[length] = (src.to(self.device), dst.to(self.device))
        return self._prefill[length]


def _head_selector(heads: list[int], n_head: int, device) -> slice | torch.Tensor | None:
    """None for all heads, a slice for evenly spaced heads (multi-head integration, summary offsets:
    a view, no copy), else an index tensor."""
    if heads == list(range(n_head)):
        return None
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    if heads == list(range(heads[0], heads[-1] + 1, step)):
        return slice(heads[0], heads[-1] + 1, step)
    return torch.tensor(heads, device=device)


class _Group:
    """The keys and values ``[B·Hg, slots, d]`` of the heads ``heads`` of one layer: views of the
    layer's buffers, rows ``offset .. offset + B·Hg·slots - 1`` (batch and head in one dimension)."""

    def __init__(self, layout: _Layout, layout_id: int, heads: list[int], n_head: int, k, v, offset: int, batch: int):
        self.layout, self.layout_id, self.offset = layout, layout_id, offset
        self.head_list = heads
        self.heads = _head_selector(heads, n_head, k.device)
        rows = batch * len(heads) * layout.slots
        self.k = k[offset : offset + rows].view(batch * len(heads), layout.slots, k.shape[-1])
        self.v = v[offset : offset + rows].view(batch * len(heads), layout.slots, v.shape[-1])

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k [B, Hg, P, dk]``, ``v [B, Hg, P, dv]``: positions ``0 .. P-1``."""
        src, dst = self.layout.prefill(k.shape[2])
        self.k.index_copy_(1, dst, k.index_select(2, src).flatten(0, 1).to(self.k.dtype))
        self.v.index_copy_(1, dst, v.index_select(2, src).flatten(0, 1))

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class LayerStep:
    """Where all heads of one layer write and read at one step (device tensors, fixed shapes), rows
    of the layer's flat buffers ``[rows, d]``.

    ``write [B·W]``: the row of each new key (``W`` writes per batch row: one per head and term of a
    compact layout), in (batch, head, term) order; ``source [B·W]``: the row of ``k.view(B·H, dk)``
    each write takes, or None when that is ``0 .. B·H - 1``; ``read [B·H·S]``: the rows query
    ``(b, h)`` gathers (``S`` per head, in head order), or None when one compact group reads its
    whole buffer; ``bias [B·H, 1, S]``: 0 for the keys the query attends to, -inf for the others
    (padding of heads that read fewer than ``S`` slots included); ``rows [B·H·S]``: ``read``, or
    the whole buffer's rows when ``read`` is None (for the fused kernel, which always gathers).
    """

    write: torch.Tensor
    source: torch.Tensor | None
    read: torch.Tensor | None
    bias: torch.Tensor
    rows: torch.Tensor


class _Plan:
    """How the head groups of a layer map onto its flat buffers; computes a :class:`LayerStep` from
    the layouts' :class:`StepIndex` once per step for every layer with the same groups.

    Group ``g`` owns rows ``offset_g + (b·Hg + i)·slots_g + slot`` (so its ``[B·Hg, slots, d]`` view
    is the buffer of the per-group layout); every head reads ``S`` rows, the most any group reads,
    and a group that reads fewer pads with its first slot, masked. Writes and reads are put in
    (batch, head) order, so a layer's heads need one scatter, one gather and no reordering.
    """

    def __init__(self, groups: list[_Group], n_head: int, batch: int, device):
        self.groups, self.batch = groups, batch
        layouts = [g.layout for g in groups]
        self.direct = len(groups) == 1 and layouts[0].compact
        self.S = max(lay.reads for lay in layouts)
        self.no_keys = any(lay.no_keys for lay in layouts)
        self.bases, heads_of_row, writes = [], [], []
        for g, lay in zip(groups, layouts):
            Hg = len(g.head_list)
            base = g.offset + torch.arange(batch * Hg) * lay.slots  # first row of (b, i)
            self.bases.append(base.to(device))
            b = torch.arange(batch).repeat_interleave(Hg)
            h = torch.tensor(g.head_list).repeat(batch)
            heads_of_row.append(b * n_head + h)  # the (b, h) of each [B·Hg] row, as b·H + h
            writes.append((b * n_head + h).repeat_interleave(lay.writes))
        row_order = torch.cat(heads_of_row)  # group-major (b, h) of each row
        self.row_perm = None if torch.equal(row_order, torch.arange(batch * n_head)) else row_order.argsort().to(device)
        src = torch.cat(writes)
        order = torch.sort(src, stable=True)
        self.write_perm = None if torch.equal(order.indices, torch.arange(src.numel())) else order.indices.to(device)
        self.source = None if torch.equal(order.values, torch.arange(batch * n_head)) else order.values.to(device)
        self.read_perm = None  # the rows of the [B·H·S] read in (b, h) order
        if self.row_perm is not None:
            self.read_perm = (self.row_perm[:, None] * self.S + torch.arange(self.S, device=device)).view(-1)
        self.pad = [
            torch.zeros(self.S - lay.reads, dtype=torch.long, device=device) if lay.reads < self.S else None
            for lay in layouts
        ]
        self.whole = [torch.arange(lay.slots, device=device) if lay.compact else None for lay in layouts]
        self.all_rows = None  # one compact group: it reads its whole buffer, rows in (b, h) order
        if self.direct:
            self.all_rows = (self.bases[0][:, None] + self.whole[0][None, :]).view(-1)

    def _rows(self, parts: list[torch.Tensor], perm: torch.Tensor | None) -> torch.Tensor:
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if perm is None else out.index_select(0, perm)

    def step(self, index: list[StepIndex]) -> LayerStep:
        """The rows of this step from the layouts' :class:`StepIndex` (``KVCache.step``)."""
        writes, reads, biases = [], [], []
        for g, base, pad, whole in zip(self.groups, self.bases, self.pad, self.whole):
            ix = index[g.layout_id]
            writes.append((base[:, None] + ix.write[None, :]).view(-1))
            bias = ix.bias
            if pad is not None:
                bias = torch.cat([bias, bias.new_full(pad.shape, float("-inf"))])
            biases.append(bias.expand(base.shape[0], -1))
            if not self.direct:
                read = whole if ix.read is None else ix.read
                if pad is not None:
                    read = torch.cat([read, pad])
                reads.append((base[:, None] + read[None, :]).view(-1))
        write = self._rows(writes, self.write_perm)
        read = None if self.direct else self._rows(reads, self.read_perm)
        bias = self._rows(biases, self.row_perm).unsqueeze(1)
        return LayerStep(write, self.source, read, bias, self.all_rows if read is None else read)


class LayerKVCache:
    """The cache of one attention layer: flat key and value buffers ``[rows, dk]``, ``[rows, dv]``
    holding one :class:`_Group` of rows per group of heads with the same terms
    (``pattern.head_groups``). Built by :class:`KVCache`.

    ``fused``: decode with the one-launch Triton kernel (:mod:`sparse_transformer.decode_kernels`) when
    the layer writes one slot per head (every pattern but the merged fixed one)."""

    def __init__(
        self, k: torch.Tensor, v: torch.Tensor, groups: list[_Group], plan_id: int, plan: _Plan, fused: bool = False
    ):
        self.k, self.v, self.groups, self.plan_id, self.plan = k, v, groups, plan_id, plan
        self.fused = fused and plan.source is None

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def _split(self, t: torch.Tensor, g: _Group) -> torch.Tensor:
        if g.heads is None:
            return t
        return t[:, g.heads] if isinstance(g.heads, slice) else t.index_select(1, g.heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: KVStep) -> torch.Tensor:
        """Store the key and value of the decoded position and attend to the keys the pattern allows,
        all heads at once: one scatter, one gather (none for one compact group), one scores
        product, one softmax (fp32), one product with the values.

        Args:
            q, k: ``[B, H, 1, dk]``; v: ``[B, H, 1, dv]``: the projections at the step's position.
            step: :meth:`KVCache.step` of that position.
        Returns:
            ``[B, H, 1, dv]`` in ``v.dtype``; a query with no allowed key gives zeros.
        """
        index = step.layers[self.plan_id]
        B, H, _, dk = q.shape
        if self.fused:
            from .decode_kernels import decode_attention

            return decode_attention(q, k, v, self.k, self.v, index.write, index.rows, index.bias, dk**-0.5)
        q, k, v = q.reshape(B * H, 1, dk), k.reshape(B * H, dk), v.reshape(B * H, -1)
        if k.dtype != self.k.dtype:  # fp16 models keep fp32 keys
            q, k = q.to(self.k.dtype), k.to(self.k.dtype)
        if v.dtype != self.v.dtype:
            v = v.to(self.v.dtype)
        if index.source is not None:  # several terms' slots per head
            k, v = k.index_select(0, index.source), v.index_select(0, index.source)
        self.k.index_copy_(0, index.write, k)
        self.v.index_copy_(0, index.write, v)
        if index.read is None:
            keys, values = self.groups[0].k, self.groups[0].v
        else:
            S = index.bias.shape[-1]
            keys = self.k.index_select(0, index.read).view(B * H, S, dk)
            values = self.v.index_select(0, index.read).view(B * H, S, -1)
        # scores + bias (-inf where masked) in one product; softmax in fp32
        p = torch.softmax(torch.baddbmm(index.bias, q, keys.transpose(1, 2), alpha=dk**-0.5), -1, dtype=torch.float32)
        if self.plan.no_keys:
            p = p.nan_to_num_(0.0)  # a query with no key: zero output
        return torch.bmm(p.to(values.dtype), values).view(B, H, 1, -1)

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys ``[B, H, P, dk]`` and values ``[B, H, P, dv]`` of positions ``0 .. P-1``
        (a prefix computed in one parallel forward pass)."""
        for g in self.groups:
            g.prefill(self._split(k, g), self._split(v, g))


@dataclass
class KVStep:
    """The indices of one decoding step: each layout's :class:`StepIndex` and each plan's
    :class:`LayerStep` (layers with the same head groups share one); ``fused_linear``: the blocks run
    their projections as fused Triton kernels (:class:`KVCache`)."""

    layouts: list[StepIndex]
    layers: list[LayerStep]
    fused_linear: bool = False


class KVCache:
    """The sparse KV cache of a whole model: one :class:`LayerKVCache` per layer, for ``batch``
    sequences of up to ``length`` positions. Build it with
    :meth:`sparse_transformer.model.SparseTransformer.new_cache`.

    Args:
        patterns: each layer's pattern (``pattern.for_layer(r)`` applied).
        n_head, batch, length: heads, batch rows and positions to hold (``length <= n_ctx``).
        dk, dv: per-head query/key and value widths.
        device: where the buffers live (``"meta"`` allocates nothing, for sizing).
        dtype: the model's dtype (values; keys see :func:`key_dtype`).
        fused: attend with the fused Triton kernel (:mod:`sparse_transformer.decode_kernels`; one launch
            per layer). None (the default) means on for CUDA buffers, where the step is 1.3-8.4x
            faster than with the attention as torch operations (docs/benchmarks.md), and off
            elsewhere; on CPU tensors it needs Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
        fused_linear: decoding steps on this cache run each block's four projections with their
            LayerNorm, GeLU and residual add as one Triton kernel each
            (:func:`~sparse_transformer.decode_kernels.decode_linear`: five launches per block with
            the fused attention). None (the default) means on for CUDA buffers, where the step of the
            ``audio`` preset is 1.5x (compiled) to 1.9x (plain CUDA graph) faster with it at batch 1
            (docs/benchmarks.md), and off elsewhere.
    """

    def __init__(
        self,
        patterns: list[Pattern],
        n_head: int,
        batch: int,
        length: int,
        dk: int,
        dv: int,
        device=None,
        dtype=torch.float32,
        fused: bool | None = None,
        fused_linear: bool | None = None,
    ):
        cuda = torch.device(device or "cpu").type == "cuda"
        self.batch, self.length = batch, length
        self.fused_linear = cuda if fused_linear is None else bool(fused_linear)
        fused = cuda if fused is None else bool(fused)
        index_device = torch.device("cpu") if torch.device(device or "cpu").type == "meta" else device
        self.layouts: list[_Layout] = []
        self.plans: list[_Plan] = []
        ids: dict[tuple[Term, ...], int] = {}
        plan_ids: dict[tuple, int] = {}
        self.layers = []
        for pattern in patterns:
            groups = pattern.head_groups(n_head)
            for terms, _ in groups:
                if terms not in ids:
                    ids[terms] = len(self.layouts)
                    self.layouts.append(_Layout(terms, length, index_device, key_dtype(dtype)))
            rows = batch * sum(len(heads) * self.layouts[ids[terms]].slots for terms, heads in groups)
            k = torch.zeros(rows, dk, device=device, dtype=key_dtype(dtype))
            v = torch.zeros(rows, dv, device=device, dtype=dtype)
            built, offset = [], 0
            for terms, heads in groups:
                layout = self.layouts[ids[terms]]
                built.append(_Group(layout, ids[terms], heads, n_head, k, v, offset, batch))
                offset += batch * len(heads) * layout.slots
            key = tuple((ids[terms], tuple(heads)) for terms, heads in groups)
            if key not in plan_ids:
                plan_ids[key] = len(self.plans)
                self.plans.append(_Plan(built, n_head, batch, index_device))
            self.layers.append(LayerKVCache(k, v, built, plan_ids[key], self.plans[plan_ids[key]], fused))
        # a dense KV cache in the same dtypes: every position of every head
        key_bytes = torch.empty(0, dtype=key_dtype(dtype)).element_size()
        value_bytes = torch.empty(0, dtype=dtype).element_size()
        self.dense_nbytes = len(patterns) * batch * n_head * length * (dk * key_bytes + dv * value_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values, all layers."""
        return sum(layer.nbytes for layer in self.layers)

    def step(self, pos: torch.Tensor) -> KVStep:
        """The rows every layer writes and reads at position ``pos`` (``[1]`` int64, on the cache's
        device; ``0 <= pos < length``, not checked, as that would sync)."""
        index = [layout.step(pos) for layout in self.layouts]
        return KVStep(index, [plan.step(index) for plan in self.plans], self.fused_linear)

    def zero_(self) -> KVCache:
        """Clear every buffer (a fresh cache, e.g. after a warm-up wrote into it)."""
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
        return self
