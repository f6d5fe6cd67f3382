"""``sparse_attention(q, k, v, pattern, backend=...)`` and its backends.

Backends (force one by name):

* ``reference``  dense masked softmax in fp32 (the oracle; O(n^2) memory).
* ``factorized`` pure PyTorch, any device, autograd, O(n·sqrt(n)) memory (``factorized.py``).
* ``triton``     fused flash-style GPU kernels, O(n) memory (``triton/``); CUDA, or CPU under
                 Triton's interpreter (``TRITON_INTERPRET=1`` in the environment; slow, for debugging).
* ``flex``       PyTorch FlexAttention composed from the same factorization (``flex.py``); CUDA only.
* ``sdpa``       ``F.scaled_dot_product_attention(is_causal=True)``; the dense pattern only.
* ``auto``       ``triton`` on CUDA, ``sdpa`` for the dense pattern, else ``factorized``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import Backend, literal_values
from ..patterns import NamedPattern, Pattern
from .common import check_packed, empty_attention, is_empty, merge_heads, split_heads

if TYPE_CHECKING:
    from .triton.tiles import Tuning

BACKENDS = literal_values(Backend)  # the schema's names (config.Backend)
_GPU_ONLY = ("triton", "flex")


def _check_inputs(q, k, v, pattern, backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(pattern, Pattern):
        raise ValueError(
            f"pattern must come from sparse_transformer.patterns (e.g. patterns.strided(128)), got {type(pattern).__name__}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-d tensor [batch, heads, n, head_dim], got shape {tuple(getattr(t, 'shape', ()))}"
            )
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [batch, heads, n, head_dim]; got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in batch, heads and n; got q {tuple(q.shape)} and v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if backend in _GPU_ONLY and q.device.type != "cuda" and not (backend == "triton" and _interpreter_requested()):
        raise ValueError(needs_cuda(backend, q.device.type))


def _interpreter_requested() -> bool:
    """``TRITON_INTERPRET=1``: Triton's kernels run on its CPU interpreter (it reads the variable when
    the kernels are first imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def needs_cuda(backend: str, device_type: str) -> str:
    """The error for a CUDA-only backend (``triton``, ``flex``) given tensors on ``device_type``."""
    if backend == "triton":
        return (
            f"backend 'triton' needs CUDA tensors; set TRITON_INTERPRET=1 (before starting Python) to run its "
            f"kernels on Triton's CPU interpreter for debugging (slow), or use backend='factorized' on {device_type}"
        )
    return f"backend {backend!r} needs CUDA tensors; use backend='factorized' on {device_type}"


# Looked up once, when this module is imported, without importing triton: resolve_backend runs
# inside compiled blocks, where an import is a graph break that splits each block in three graphs.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_available() -> bool:
    return _TRITON_INSTALLED


def backend_problem(backend: str, pattern: Pattern, device: torch.device) -> str | None:
    """Why ``backend`` cannot compute ``pattern`` on ``device`` (a phrase), or None when it can:
    checked before a run starts, so that the first forward pass does not find out."""
    if backend in _GPU_ONLY and device.type != "cuda":
        return f"backend {backend!r} needs a CUDA device, not {device.type}"
    if backend == "triton" and not _triton_available():
        return "backend 'triton' needs the triton package, which is not installed"
    if backend == "sdpa" and not (isinstance(pattern, NamedPattern) and pattern.name == "dense"):
        return "backend 'sdpa' computes only the dense pattern"
    return None


def resolve_backend(backend: str, pattern: Pattern, device: torch.device) -> str:
    """The backend ``auto`` stands for on ``device`` (or ``backend`` itself when forced)."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and _triton_available():
        return "triton"
    if isinstance(pattern, NamedPattern) and pattern.name == "dense":
        return "sdpa"
    return "factorized"


def _sdpa(q, k, v, pattern, scale):
    """``F.scaled_dot_product_attention(is_causal=True)`` for the dense pattern (ValueError for any other)."""
    if not (isinstance(pattern, NamedPattern) and pattern.name == "dense"):
        raise ValueError("backend 'sdpa' computes only the dense causal pattern; use 'factorized' or 'triton'")
    if is_empty(q):
        return empty_attention(q, k, v, pattern)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    backend: str = "auto",
    scale: float | None = None,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """Causal attention restricted to ``pattern``.

    Args:
        q, k: ``[batch, heads, n, dk]``; v: ``[batch, heads, n, dv]`` (dk may differ from dv, as with
            the paper's half-size query/key projections).
        pattern: from :mod:`sparse_transformer.patterns`; head ``h`` reads the keys of
            ``pattern.mask(n, head=h)``.
        backend: see the module docstring.
        scale: softmax scale, default ``dk ** -0.5``.
        tuning: ``triton`` only: a per-call override of its tile choice
            (:class:`sparse_transformer.attention.triton.Tuning`), for tuning sweeps and tests.

    Returns: ``[batch, heads, n, dv]`` in ``q.dtype``. Queries with no allowed key give zeros. A
        batch of 0, 0 heads or ``n = 0`` gives an empty ``[batch, heads, n, dv]`` result (as
        ``F.scaled_dot_product_attention`` does) with empty gradients of the inputs' shapes, on every
        backend. ``reference`` and ``factorized`` compute float64 inputs in float64.

    Raises:
        ValueError: an unknown backend, a non-pattern, tensors that are not 4-d or do not match in
            shape, dtype or device, a GPU-only backend on CPU tensors (``triton`` runs on them with
            ``TRITON_INTERPRET=1``), ``sdpa`` with a sparse pattern, ``tuning`` for a backend other
            than ``triton``, or an unresolved Interleaved pattern.
    """
    _check_inputs(q, k, v, pattern, backend)
    name = resolve_backend(backend, pattern, q.device)
    if tuning is not None and name != "triton":
        raise ValueError(f"tuning sets the triton backend's tiles; this call runs backend {name!r}")
    if name == "reference":
        from .reference import reference_attention

        return reference_attention(q, k, v, pattern, scale)
    if name == "factorized":
        from .factorized import factorized_attention

        return factorized_attention(q, k, v, pattern, scale)
    if name == "sdpa":
        return _sdpa(q, k, v, pattern, scale)
    if name == "flex":
        from .flex import flex_attention_sparse

        return flex_attention_sparse(q, k, v, pattern, scale)
    from .triton import triton_attention

    return triton_attention(q, k, v, pattern, scale, tuning=tuning)


def sparse_attention_qkvpacked(
    qkv: torch.Tensor,
    n_heads: int,
    pattern: Pattern,
    qk_dim: int | None = None,
    backend: str = "auto",
    scale: float | None = None,
    tuning: Tuning | None = None,
) -> torch.Tensor:
    """:func:`sparse_attention` of the heads of one packed q, k, v projection, heads merged (paper
    §4: the heads of one W_qkv; the layout the model's projection writes).

    Args:
        qkv: ``[batch, n, 2·qk_dim + heads·dv]``: q's heads, then k's, then v's, each head's columns
            together (q is ``qkv[..., :qk_dim]`` viewed as ``[batch, n, heads, qk_dim / heads]``).
        n_heads: heads; qk_dim: the width of q (and k), default a third of the width (q, k and v
            the same width); smaller for the paper's half-size query/key projections.
        pattern, backend, scale, tuning: as :func:`sparse_attention`.

    Returns: ``[batch, n, heads·dv]`` in ``qkv.dtype``. On ``triton`` the kernels read q, k, v in
        place and the backward writes the gradient of ``qkv`` as one tensor (three gradients would
        be concatenated by a copy); other backends run :func:`sparse_attention` on the heads.

    Raises:
        ValueError: ``qkv`` not 3-d, ``n_heads`` or ``qk_dim`` not an integer, widths that do not
            split into ``n_heads`` heads (``common.check_packed``), and every error of
            :func:`sparse_attention`.
    """
    n_heads, qk_dim = check_packed(qkv, n_heads, qk_dim)
    q, k, v = split_heads(qkv, n_heads, qk_dim)
    _check_inputs(q, k, v, pattern, backend)
    if resolve_backend(backend, pattern, qkv.device) == "triton":
        from .triton import triton_attention_qkvpacked

        return triton_attention_qkvpacked(qkv, n_heads, qk_dim, pattern, scale, tuning=tuning)
    return merge_heads(sparse_attention(q, k, v, pattern, backend, scale, tuning))


__all__ = ["BACKENDS", "resolve_backend", "sparse_attention", "sparse_attention_qkvpacked"]
