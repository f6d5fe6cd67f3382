"""The fused decoding kernels (``decode_kernels.py``: attention, and the linear layers with their norm,
GeLU and residual) against the torch step and the full forward.

Without CUDA the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported), at small sizes: it is slow there. ``@pytest.mark.gpu`` tests run it compiled,
in bf16, captured in a CUDA graph and under ``torch.compile``.
"""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from test_sample import PATTERNS, _decode_all, tiny

from sparse_transformer.model import gelu, project
from sparse_transformer.sample import Decoder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars
interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests need the Triton interpreter"
)
n = 12


def _decode(model, x, fused, fused_linear=False):
    cache = model.new_cache(x.shape[0], fused=fused, fused_linear=fused_linear)
    assert all(layer.fused == fused for layer in cache.layers)
    return torch.stack([model.decode_step(x[:, i - 1] if i else None, i, cache) for i in range(x.shape[1])], 1)


def _kernel_case(device, dtype=torch.float32, B=2, H=3, S=40, dk=8, dv=12):
    """Random buffers and a step whose reads include each query's own new row (holding an old key
    until the step writes it), some masked rows and one query with every row masked; the expected
    output and buffers from torch operations (write, then gather and attend)."""
    g = torch.Generator().manual_seed(0)
    rows = B * H * S
    k_buf, v_buf = torch.randn(rows, dk, generator=g), torch.randn(rows, dv, generator=g)
    q, k, v = (
        torch.randn(B, H, 1, dk, generator=g),
        torch.randn(B, H, 1, dk, generator=g),
        torch.randn(B, H, 1, dv, generator=g),
    )
    write = torch.arange(B * H) * S + 3  # each query owns rows [i·S, (i+1)·S)
    read = (torch.arange(B * H)[:, None] * S + torch.randperm(S, generator=g)[None, :]).view(-1)
    bias = torch.where(torch.rand(B * H, 1, S, generator=g) < 0.3, float("-inf"), 0.0)
    bias[torch.arange(B * H), 0, (read.view(B * H, S) == write[:, None]).int().argmax(1)] = 0.0  # new row attended
    bias[1] = float("-inf")  # a query with no key: zeros
    k2, v2 = k_buf.clone(), v_buf.clone()
    k2[write], v2[write] = k.reshape(B * H, dk), v.reshape(B * H, dv)
    scores = torch.einsum("qd,qsd->qs", q.reshape(B * H, dk), k2[read].view(B * H, S, dk)) * dk**-0.5 + bias[:, 0]
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    want = torch.einsum("qs,qsd->qd", p, v2[read].view(B * H, S, dv)).view(B, H, 1, dv)
    args = [t.to(device=device, dtype=dtype) for t in (q, k, v, k_buf, v_buf)]
    args += [write.to(device), read.to(device), bias.to(device, dtype), dk**-0.5]
    return args, (want, k2, v2)


@interpreter
def test_kernel_writes_then_attends():
    """The new key and value are used from registers where the query reads their row (no barrier
    orders the write before the reads); every output and buffer row equals torch's write-then-attend,
    and a query with no key gets zeros."""
    from sparse_transformer.decode_kernels import decode_attention

    args, (want, k2, v2) = _kernel_case("cpu")
    out = decode_attention(*args)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(args[3], k2) and torch.equal(args[4], v2)
    assert not out[1 // 3, 1 % 3].any()


@pytest.mark.gpu
def test_cuda_kernel_writes_then_attends():
    """The batch-1 shape of the audio preset (16 queries of 512 rows) in bf16, compiled: the same."""
    from sparse_transformer.decode_kernels import decode_attention

    args, (want, k2, v2) = _kernel_case("cuda", torch.bfloat16, 1, 16, 512, 32, 32)
    out = decode_attention(*args)
    torch.testing.assert_close(out.float().cpu(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(args[3].float().cpu(), k2, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(args[4].float().cpu(), v2, atol=1e-2, rtol=1e-2)


@interpreter
@pytest.mark.parametrize("name", ["strided-multihead", "fixed-multihead", "dense"])
def test_fused_step_matches_torch_step_and_full_forward(name):
    """Multi-group layers (fixed-multihead: three groups, queries with no key), one compact group
    (dense: the whole buffer), batch 2, fp32."""
    model, _ = tiny(n=n, **PATTERNS[name])
    x = torch.randint(0, 256, (2, n))
    with torch.no_grad():
        full = model(x)
        fused = _decode(model, x, True)
        plain = _decode(model, x, False)
    torch.testing.assert_close(fused, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


@interpreter
def test_fused_step_fp16_keeps_fp32_keys():
    model32, _ = tiny(n=n, **PATTERNS["strided-multihead"])
    model = copy.deepcopy(model32).half()
    x = torch.randint(0, 256, (1, n))
    with torch.no_grad():
        exact = model32(x)
        error = (model(x).float() - exact).abs().max()
        cache = model.new_cache(1, fused=True)
        assert cache.layers[0].k.dtype == torch.float32 and cache.layers[0].v.dtype == torch.float16
        steps = torch.stack([model.decode_step(x[:, i - 1], i, cache).float() for i in range(n)], 1)
    assert (steps - exact).abs().max() <= 2 * error


@interpreter
def test_fused_step_traces_under_torch_compile():
    """The kernel is one opaque custom op with declared mutations: a full graph, the eager results."""
    model, _ = tiny(n=n, **PATTERNS["strided-multihead"])
    x = torch.randint(0, 256, (1, n))
    with torch.no_grad():
        cache = model.new_cache(1, fused=True)
        step = torch.compile(
            lambda t, p: model.decode_step(t, p, cache), backend="aot_eager", fullgraph=True, dynamic=False
        )
        compiled = torch.stack([step(x[:, i - 1], torch.tensor([i])) for i in range(n)], 1)
        torch.testing.assert_close(compiled, _decode(model, x, True), atol=1e-6, rtol=1e-6)


def test_fused_kernel_is_off_on_cpu_and_for_two_slots_per_head():
    model, _ = tiny(**PATTERNS["strided-multihead"])
    assert not any(layer.fused for layer in model.new_cache(1).layers)  # CPU: the torch step
    model, _ = tiny(**PATTERNS["fixed-both"])  # block and summary slot per head: the torch step
    assert not any(layer.fused for layer in model.new_cache(1, fused=True).layers)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["strided-multihead", "strided-both", "dense", "fixed-multihead", "fixed-summary"])
def test_cuda_fused_step_matches_torch_step(name):
    """bf16 on the GPU: the fused step (opt-in) is no further from the fp32 full forward
    pass than the torch step plus the bf16 forward's own error."""
    length = 64
    model32, _ = tiny(n=length, **PATTERNS[name] | {"stride": 8})
    model32 = model32.cuda()
    model = copy.deepcopy(model32).to(torch.bfloat16)
    x = torch.randint(0, 256, (3, length), device="cuda")
    with torch.no_grad():
        assert all(layer.fused for layer in model.new_cache(3).layers)  # the default on CUDA
        exact = model32(x)
        error = (model(x).float() - exact).abs().max()
        fused = _decode(model, x, True).float()
        plain = _decode(model, x, False).float()
    assert (fused - exact).abs().max() <= 2 * error + 1e-3
    assert (fused - plain).abs().max() <= 2 * error + 1e-3


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_compiled_fused_step_writes_the_cache_in_place():
    """Compiled and captured, the fused step equals the full forward pass and allocates no copy of
    the cache (a functionalized custom op that inductor failed to re-inplace would clone it)."""
    length = 1024
    model, _ = tiny(n=length, **PATTERNS["strided-multihead"] | {"stride": 32})
    model = model.cuda()
    with torch.inference_mode():
        logits, tokens = _decode_all(model, 32, graphs=True, compile=True)
        torch.testing.assert_close(logits, model(tokens)[:, :32], atol=1e-3, rtol=1e-3)
        tokens = torch.zeros(2, length, dtype=torch.long, device="cuda")
        decoder = Decoder(model, tokens, temperature=0.0, compile=True)
        assert decoder.compiled and all(layer.fused for layer in decoder.cache.layers)
        decoder.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        decoder.step()
        torch.cuda.synchronize()
        k = decoder.cache.layers[0].k
        assert torch.cuda.max_memory_allocated() - before < k.numel() * k.element_size()


def _linear_case(M, K, N, device="cpu", dtype=torch.float32, bias=True):
    """A LayerNorm and a Linear with random (not default) parameters, inputs and a residual."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    norm, linear = torch.nn.LayerNorm(K), torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        for p in (*norm.parameters(), *linear.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p is linear.weight else 1.0))
    x = 3.0 + 2.0 * torch.randn(M, 1, K, generator=g)  # a mean far from 0: the two-pass variance matters
    r = torch.randn(M, 1, N, generator=g)
    return [m.to(device, dtype) for m in (norm, linear)] + [t.to(device, dtype) for t in (x, r)]


@interpreter
@pytest.mark.parametrize("M", [0, 1, 3])  # 1: the broadcast product; 3: tl.dot on 16 x 16 tiles
@pytest.mark.parametrize("K", [300, 1500])  # the input rows in one block (read once), or several
@pytest.mark.parametrize(
    ("use_norm", "act", "residual", "bias"),
    [(True, False, False, False), (True, True, False, True), (False, False, True, True), (False, False, False, False)],
)
def test_linear_kernel_matches_torch(M, K, use_norm, act, residual, bias):
    """``project(..., fused=True)`` against its torch path, fp32: K = 300 fits one K block (the rows
    normalized in registers), K = 1,500 spans several (two passes of statistics); neither is a power
    of two, and N = 40 is no multiple of the output tile."""
    norm, linear, x, r = _linear_case(M, K, 40, bias=bias)
    kw = {"norm": norm if use_norm else None, "act": gelu if act else None, "residual": r if residual else None}
    with torch.no_grad():
        want = project(linear, x, **kw)
        got = project(linear, x, **kw, fused=True)
    assert got.shape == want.shape == (M, 1, 40) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@interpreter
def test_fused_linear_step_matches_full_forward_and_traces_under_torch_compile():
    """A whole step of fused kernels (attention, the projections with their norms, GeLU and
    residuals, the head), with biases, batch 2, fp32: the logits of the full forward pass; traced by
    torch.compile (the kernels are opaque custom ops), the same logits. 8 positions, 3 of them
    compiled: the interpreter is slow (with the stride of 5, positions 5-7 read keys of both terms)."""
    model, _ = tiny(n=n, **PATTERNS["strided-multihead"], bias=True)
    with torch.no_grad():
        for b in model.blocks:
            for m in (b.attn.qkv, b.attn.proj, b.ff.fc, b.ff.proj):
                m.bias.normal_()
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        fused = _decode(model, x, True, fused_linear=True)
        torch.testing.assert_close(fused, model(x), atol=1e-4, rtol=1e-4)
        cache = model.new_cache(2, fused=True, fused_linear=True)
        step = torch.compile(
            lambda t, p: model.decode_step(t, p, cache), backend="aot_eager", fullgraph=True, dynamic=False
        )
        compiled = torch.stack([step(x[:, i - 1], torch.tensor([i])) for i in range(3)], 1)
    torch.testing.assert_close(compiled, fused[:, :3], atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 64])
def test_cuda_linear_kernel_matches_torch(M):
    """bf16, the audio preset's widths (d 512, hidden 2,048): each of a block's four projections
    against fp32 torch, no further than the bf16 torch path is."""
    for K, N, use_norm, act, residual in [(512, 1536, True, False, False), (512, 512, False, False, True),
                                          (512, 2048, True, True, False), (2048, 512, False, False, True)]:  # fmt: skip
        norm, linear, x, r = _linear_case(M, K, N, "cuda")
        kw = {"norm": norm if use_norm else None, "act": gelu if act else None, "residual": r if residual else None}
        lo = [copy.deepcopy(m).to(torch.bfloat16) for m in (norm, linear)] + [t.to(torch.bfloat16) for t in (x, r)]
        kw16 = {"norm": lo[0] if use_norm else None, "act": kw["act"], "residual": lo[3] if residual else None}
        with torch.no_grad():
            exact = project(linear, x, **kw)
            error = (project(lo[1], lo[2], **kw16).float() - exact).abs().max()
            got = project(lo[1], lo[2], **kw16, fused=True)
        assert got.dtype == torch.bfloat16
        assert (got.float() - exact).abs().max() <= 1.5 * error + 1e-3, (K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_fused_linear_step_matches_full_forward(graphs):
    """bf16, captured or not: a step of fused attention and fused linears is no further from the
    fp32 full forward pass than the torch step plus the bf16 forward's own error."""
    length = 64
    model32, _ = tiny(n=length, **PATTERNS["strided-multihead"] | {"stride": 8})
    model32 = model32.cuda()
    model = copy.deepcopy(model32).to(torch.bfloat16)
    x = torch.randint(0, 256, (3, length), device="cuda")
    with torch.no_grad():
        exact = model32(x)
        error = (model(x).float() - exact).abs().max()
        plain = _decode(model, x, True).float()
        if graphs:
            tokens = torch.zeros(2, length, dtype=torch.long, device="cuda")
            decoder = Decoder(model, tokens, temperature=0.0, graphs=True, fused_linear=True)
            assert decoder.graph is not None
            logits = torch.stack([decoder.step().float().clone() for _ in range(length)], 1)
            fused, exact = logits, model32(tokens)
        else:
            fused = _decode(model, x, True, True).float()
    assert (fused - exact).abs().max() <= 2 * error + 1e-3
    if not graphs:
        assert (fused - plain).abs().max() <= 2 * error + 1e-3
