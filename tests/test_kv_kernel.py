"""The fused decode-attention kernel (``kv_kernel.py``) against the torch step and the full forward.

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

from sparse_transformer.sample import Decoder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars
interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests need the Triton interpreter"
)
n = 12


def _decode(model, x, fused):
    cache = model.new_cache(x.shape[0], fused=fused)
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
    from sparse_transformer.kv_kernel import decode_attention

    args, (want, k2, v2) = _kernel_case("cpu")
    out = decode_attention(*args)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(args[3], k2) and torch.equal(args[4], v2)
    assert not out[1 // 3, 1 % 3].any()


@pytest.mark.gpu
def test_cuda_kernel_writes_then_attends():
    """The batch-1 shape of the audio preset (16 queries of 512 rows) in bf16, compiled: the same."""
    from sparse_transformer.kv_kernel import decode_attention

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
