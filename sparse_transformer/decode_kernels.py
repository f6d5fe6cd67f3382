"""The fused Triton kernels of a decoding step (one token per sequence, paper §5.3's sampling).

A decoding step at batch 1 is bound by the latency of small kernels, not by arithmetic or bandwidth:
the 48-layer ``audio`` preset reads 0.3 GB of weights per token (63 us at an H200's 4.8 TB/s) but ran
about 400 kernels of a few microseconds each per step. The two kernels here cut the launches per
layer: :func:`decode_attention` replaces the scatter, gather, scores, softmax and value product of
the torch step, and :func:`decode_linear` runs a linear layer with its pre-LayerNorm, GeLU and
residual add in one launch, so a block is five launches (LN + QKV, attention, W_p + residual,
LN + W_1 + GeLU, W_2 + residual).

**decode_attention.** For each batch row ``b`` and head ``h`` (the query ``b·H + h``), the kernel

1. writes the new key and value of the decoded position into row ``write[b·H + h]`` of the layer's
   flat key and value buffers (the KV cache slot, :mod:`sparse_transformer.kv_cache`),
2. gathers the ``S`` rows ``read[(b·H + h)·S : ...]`` of those buffers (the keys the pattern gives
   the head, padded and masked to a fixed ``S``: paper §4.2-4.3),
3. computes the scores ``q·k·scale + bias`` and an online softmax in fp32 over blocks of rows, and
4. the weighted sum of the values; a query whose rows are all masked gets zeros.

One program per query. The new key and value are used from registers wherever the program meets
their row (as if written first, as the torch step does), so no barrier orders its write before its
reads (4.4 us per layer in the compiled batch-1 step of the ``audio`` preset on an H200; 6.6 us
with the barrier, measured in an earlier call). Splitting a query's rows over several programs with
a log-sum-exp merge of their partials (flash-decoding's scheme, to occupy more SMs at batch 1) was
measured slower there (5.9 us: the partials' stores, the atomic count and the merge cost more than
the extra parallelism saved). Programs of different queries never read each other's rows (the rows
of different heads and batch rows are disjoint). Scores and probabilities stay in fp32 (the torch
step rounds the scores to the model's dtype before its fp32 softmax), so the two paths agree to the
dtype's rounding, not bit for bit.

**decode_linear.** ``residual + act(LayerNorm(x) @ W^T + b)`` for the few rows of a step: one
program per tile of output features (two features for a row or two, :func:`_linear_tile`) reads
its rows of ``W`` once for every batch row, normalizes the input rows in fp32 in its prologue (they
are ``d_model`` wide, a few KB) and applies bias, GeLU and the residual to the fp32 accumulator
before the single rounding to the output dtype (the torch path rounds after the product and again
after the add, so the two agree to the dtype's rounding).

Every shape is fixed and the position lives only in index tensors, so the launches can be captured
in a CUDA graph; both are ``torch.library.custom_op`` s that declare what they write, so
``torch.compile`` keeps each as one opaque kernel. Triton is imported when this module is; the KV
cache and the model import it only for CUDA tensors (or when asked to, e.g. in tests under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_attention", "decode_linear"]


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


@triton.jit
def _tile_product(x, w, DOT: tl.constexpr, IEEE: tl.constexpr):
    """``x [BLOCK_M, BLOCK_K] @ w[BLOCK_N, BLOCK_K]^T`` in fp32: ``tl.dot`` (``ieee`` for fp32 weights), or
    a broadcast product and a sum for a row or two (no padding of the rows to 16)."""
    if DOT:
        if IEEE:
            return tl.dot(x, tl.trans(w), input_precision="ieee")
        return tl.dot(x, tl.trans(w))
    return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _decode_linear_kernel(
    X, W, BIAS, G, BETA, R, OUT,
    M, N, K, eps,
    sx, sw, sr, so,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    x_rows = X + rm[:, None].to(tl.int64) * sx
    w_rows = W + rn[:, None].to(tl.int64) * sw
    if ONE_BLOCK:  # K <= BLOCK_K: the input rows are read once and normalized in registers
        rk = tl.arange(0, BLOCK_K)
        mk = rk < K
        w = tl.load(w_rows + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        x = tl.load(x_rows + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if NORM:  # LayerNorm statistics in fp32: the mean, then the centred squares
            mean = tl.sum(x, axis=1) / K
            xc = tl.where(mk[None, :], x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
            g = tl.load(G + rk, mask=mk, other=0.0).to(tl.float32)
            beta = tl.load(BETA + rk, mask=mk, other=0.0).to(tl.float32)
            x = xc * rstd[:, None] * g[None, :] + beta[None, :]
        # the normalized input is rounded to the weights' dtype, as the torch path's LayerNorm output is
        acc = _tile_product(x.to(w.dtype), w, DOT, IEEE)
    else:
        if NORM:  # statistics over blocks of K in fp32, two passes (mean, then centred squares)
            mean = tl.zeros((BLOCK_M,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + rk[None, :], mask=mm[:, None] & (rk < K)[None, :], other=0.0)
                mean += tl.sum(x.to(tl.float32), axis=1)
            mean = mean / K
            var = tl.zeros((BLOCK_M,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = (rk < K)[None, :]
                x = tl.load(x_rows + rk[None, :], mask=mm[:, None] & mk, other=0.0)
                xc = tl.where(mk, x.to(tl.float32) - mean[:, None], 0.0)
                var += tl.sum(xc * xc, axis=1)
            rstd = 1.0 / tl.sqrt(var / K + eps)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            x = tl.load(x_rows + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0).to(tl.float32)
            if NORM:
                g = tl.load(G + rk, mask=mk, other=0.0).to(tl.float32)
                beta = tl.load(BETA + rk, mask=mk, other=0.0).to(tl.float32)
                x = (x - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
            w = tl.load(w_rows + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
            acc += _tile_product(x.to(w.dtype), w, DOT, IEEE)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    if GELU:  # the paper's approximation x·sigmoid(1.702x)
        acc = acc * tl.sigmoid(1.702 * acc)
    out_mask = mm[:, None] & mn[None, :]
    if RESIDUAL:
        acc += tl.load(R + rm[:, None].to(tl.int64) * sr + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(OUT + rm[:, None].to(tl.int64) * so + rn[None, :], acc.to(OUT.dtype.element_ty), mask=out_mask)


def _linear_tile(M: int, K: int, interpreted: bool = False) -> dict:
    """Tiles and warps of :func:`decode_linear` for ``M`` rows of width ``K``.

    One or two rows: a broadcast product over 2 output features per program, one warp, the row's
    ``K`` in one or two blocks: the widest grid (256-1,024 programs for the ``audio`` preset's 512-2,048
    features), each program a short run of loads. Measured on an H200 (bf16, graphs of 48 launches,
    each a different weight matrix): 1.9-3.6 us per launch at M = 1 against 2.0-5.7 us with 8
    features, 4 warps and blocks of 512, and 3.1-5.8 us for cuBLAS's GEMV alone (LayerNorm, GeLU
    and residual not counted). 3-16 rows: ``tl.dot`` on 16 x 16 tiles (the smallest tensor-core
    tile) over blocks of 512; more: 16 x 64 tiles over blocks of 256 (fewer re-reads of the weights).
    ``interpreted`` (CPU tensors: Triton's interpreter, whose cost is per program): 16 features per
    program for a row or two.
    """
    if M <= 2:
        block_m = triton.next_power_of_2(M)
        return {
            "BLOCK_M": block_m,
            "BLOCK_N": 16 if interpreted else 2,
            "BLOCK_K": min(1024 // block_m, triton.next_power_of_2(K)),
            "DOT": False,
            "num_warps": 1,
        }
    block_n, block_k = (16, 512) if M <= 16 else (64, 256)
    return {
        "BLOCK_M": 16,
        "BLOCK_N": block_n,
        "BLOCK_K": min(block_k, max(16, triton.next_power_of_2(K))),
        "DOT": True,
        "num_warps": 4,
    }


@torch.library.custom_op("sparse_transformer::decode_linear", mutates_args=())
def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    gelu: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``residual + gelu(LayerNorm(x) @ weight^T + bias)`` in one launch, for the rows of a decoding step.

    Each part is optional: the LayerNorm (paper §5.2's pre-norm) when ``norm_weight`` is given, the
    GeLU (x·sigmoid(1.702x), paper §5.2) when ``gelu``, the residual add when ``residual`` is given.

    Args:
        x: ``[M, K]`` with a unit last stride (M: batch rows of the step).
        weight: ``[N, K]`` (an ``nn.Linear``'s), unit last stride; bias ``[N]`` or None.
        norm_weight, norm_bias: ``[K]`` LayerNorm scale and shift, both or neither; eps: its epsilon.
        residual: ``[M, N]`` with a unit last stride, or None.
    Returns:
        ``[M, N]`` in ``x.dtype``. Statistics, products and epilogue run in fp32; the normalized input
        is rounded to ``weight.dtype`` before the product (as ``linear(layer_norm(x))`` rounds it).
    Raises:
        ValueError: only one of ``norm_weight`` and ``norm_bias`` (a LayerNorm without its affine
            parameters: pass ones and zeros).
    """
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError(
            "decode_linear: give norm_weight and norm_bias together (ones and zeros for a plain LayerNorm)"
        )
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    tile = _linear_tile(M, K, interpreted=x.device.type == "cpu")
    r = out if residual is None else residual
    grid = (triton.cdiv(N, tile["BLOCK_N"]), triton.cdiv(M, tile["BLOCK_M"]))
    _decode_linear_kernel[grid](
        x, weight, weight if bias is None else bias,
        weight if norm_weight is None else norm_weight, weight if norm_bias is None else norm_bias,
        r, out, M, N, K, eps, x.stride(0), weight.stride(0), r.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, GELU=gelu, RESIDUAL=residual is not None,
        IEEE=weight.dtype == torch.float32, ONE_BLOCK=K <= tile["BLOCK_K"], **tile,
    )  # fmt: skip
    return out


@decode_linear.register_fake
def _(x, weight, bias, norm_weight, norm_bias, eps, gelu, residual):
    return x.new_empty(x.shape[0], weight.shape[0])
