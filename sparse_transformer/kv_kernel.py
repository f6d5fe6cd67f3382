"""One fused Triton kernel for the attention of a decoding step: all heads of a layer in one launch.

For each batch row ``b`` and head ``h`` (the query ``b·H + h``), the kernel

1. writes the new key and value of the decoded position into row ``write[b·H + h]`` of the layer's
   flat key and value buffers (the KV cache slot, :mod:`sparse_transformer.kv_cache`),
2. gathers the ``S`` rows ``read[(b·H + h)·S : ...]`` of those buffers (the keys the pattern gives
   the head, padded and masked to a fixed ``S``: paper §4.2-4.3),
3. computes the scores ``q·k·scale + bias`` and an online softmax in fp32 over blocks of rows, and
4. the weighted sum of the values; a query whose rows are all masked gets zeros.

One program per query. The new key and value are used from registers wherever the program meets
their row (as if written first, as the torch step does), so no barrier orders its write before its
reads (4.4 us per layer in the compiled batch-1 step of the ``audio`` preset on an H200; 6.6 us
with the barrier, measured in an earlier call). Splitting a query's rows over several programs with a log-sum-exp merge of their partials
(flash-decoding's scheme, to occupy more SMs at batch 1) was measured slower there (5.9 us: the
partials' stores, the atomic count and the merge cost more than the extra parallelism saved).

It replaces the scatter, gather, scores product, softmax and value product of the torch step (five
to eight kernels per layer) by one launch. Every shape is fixed and the position lives only in the
index tensors, so the launch can be captured in a CUDA graph; it is a ``torch.library.custom_op``
that declares the buffers it writes, so ``torch.compile`` keeps it as one opaque kernel. Programs
of different queries never read each other's rows (the rows of different heads and batch rows are
disjoint).

Scores and probabilities stay in fp32 (the torch step rounds the scores to the model's dtype
before its fp32 softmax), so the two paths agree to the dtype's rounding, not bit for bit.
Triton is imported when this module is; the KV cache imports it only for CUDA tensors (or when
asked to, e.g. in tests under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_attention"]


@triton.jit
def _decode_attention_kernel(
    Q, K_NEW, V_NEW, K_BUF, V_BUF, WRITE, READ, BIAS, OUT,
    H, S, scale,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sbias_r, sbias_s,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # the query b·H + h
    b = pid // H
    h = pid % H
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    mk = dk < DK
    mv = dv < DV
    q = tl.load(Q + b * sq_b + h * sq_h + dk, mask=mk, other=0.0).to(tl.float32)
    k_new = tl.load(K_NEW + b * sk_b + h * sk_h + dk, mask=mk, other=0.0).to(K_BUF.dtype.element_ty)
    v_new = tl.load(V_NEW + b * sv_b + h * sv_h + dv, mask=mv, other=0.0).to(V_BUF.dtype.element_ty)
    w = tl.load(WRITE + pid).to(tl.int64)
    tl.store(K_BUF + w * DK + dk, k_new, mask=mk)
    tl.store(V_BUF + w * DV + dv, v_new, mask=mv)
    k_new = k_new.to(tl.float32)
    v_new = v_new.to(tl.float32)

    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for start in range(0, S, BLOCK_S):
        s_idx = start + tl.arange(0, BLOCK_S)
        ms = s_idx < S
        rows = tl.load(READ + pid.to(tl.int64) * S + s_idx, mask=ms, other=0).to(tl.int64)
        new = (rows == w)[:, None]  # the decoded position's row: its key and value from registers
        keys = tl.load(K_BUF + rows[:, None] * DK + dk[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
        keys = tl.where(new, k_new[None, :], keys.to(tl.float32))
        bias = tl.load(BIAS + pid * sbias_r + s_idx * sbias_s, mask=ms, other=float("-inf")).to(tl.float32)
        scores = tl.sum(keys * q[None, :], axis=1) * scale + bias
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every row so far masked
        p = tl.exp(scores - m_safe)
        alpha = tl.exp(m_i - m_safe)
        values = tl.load(V_BUF + rows[:, None] * DV + dv[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        values = tl.where(new, v_new[None, :], values.to(tl.float32))
        acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)
    tl.store(OUT + pid.to(tl.int64) * DV + dv, out.to(OUT.dtype.element_ty), mask=mv)


@torch.library.custom_op("sparse_transformer::decode_attention", mutates_args=("k_buf", "v_buf"))
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    write: torch.Tensor,
    read: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store the new key and value of every head and attend to ``S`` gathered rows, in one launch.

    Args:
        q, k: ``[B, H, 1, dk]``; v: ``[B, H, 1, dv]`` (any strides with a unit last stride): the
            projections at the decoded position.
        k_buf ``[rows, dk]``, v_buf ``[rows, dv]``: the layer's contiguous flat cache buffers
            (written in place: row ``write[b·H + h]`` gets head ``h``'s key and value of row ``b``).
        write: ``[B·H]`` int64 rows of the new keys, distinct for distinct ``(b, h)``.
        read: ``[B·H·S]`` int64 rows query ``(b, h)`` reads, ``S`` consecutive per query; the rows of
            different queries must not overlap one another's written rows.
        bias: ``[B·H, 1, S]`` (any strides): 0 for an attended row, -inf for a masked one.
        scale: the softmax scale (``dk ** -0.5``).
    Returns:
        ``[B, H, 1, dv]`` in ``v_buf.dtype``: ``softmax(q·k·scale + bias) @ values`` in fp32, zeros
        for a query whose rows are all masked.
    """
    B, H, _, DK = q.shape
    DV = v.shape[-1]
    S = bias.shape[-1]
    out = torch.empty(B, H, 1, DV, device=q.device, dtype=v_buf.dtype)
    # all of a strided head's rows in one block up to 512 (the rows' gathers are then issued at
    # once): 4.2 us per launch at S = 512, dk = 32 on an H200, against 8.6 us for blocks of 128
    block_s = min(512, triton.next_power_of_2(max(S, 16)))
    _decode_attention_kernel[(B * H,)](
        q, k, v, k_buf, v_buf, write, read, bias, out,
        H, S, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), bias.stride(0), bias.stride(2),
        DK=DK, DV=DV, BLOCK_DK=triton.next_power_of_2(DK), BLOCK_DV=triton.next_power_of_2(DV), BLOCK_S=block_s,
        num_warps=4,
    )  # fmt: skip
    return out


@decode_attention.register_fake
def _(q, k, v, k_buf, v_buf, write, read, bias, scale):
    B, H = q.shape[:2]
    return q.new_empty(B, H, 1, v.shape[-1], dtype=v_buf.dtype)
