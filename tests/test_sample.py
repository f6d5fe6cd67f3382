"""Sampling: the sparse KV cache against the full forward pass, generate(), and sample files."""

from __future__ import annotations

import copy
import math
import sys
import types
import wave

import numpy as np
import pytest
import torch
from conftest import write_prepared
from PIL import Image

from sparse_transformer.config import Config, DataConfig, ModelConfig, validate
from sparse_transformer.model import SparseTransformer
from sparse_transformer.sample import Decoder, generate, sample_command, sample_logits

N = 23  # not a multiple of the stride 5

PATTERNS = {
    "dense": {"pattern": "dense"},
    "local": {"pattern": "local", "stride": 5},
    "strided-local": {"pattern": "strided", "stride": 5, "part": "local"},
    "strided-stride": {"pattern": "strided", "stride": 5, "part": "stride"},
    "strided-both": {"pattern": "strided", "stride": 5},
    "fixed-block": {"pattern": "fixed", "stride": 5, "c": 2, "num_verts": 2, "part": "block"},
    "fixed-summary": {"pattern": "fixed", "stride": 5, "c": 2, "num_verts": 2, "part": "summary"},
    "fixed-both": {"pattern": "fixed", "stride": 5, "c": 2, "num_verts": 2},
    "strided-interleaved": {"pattern": "strided", "stride": 5, "integration": "interleaved"},
    "strided-multihead": {"pattern": "strided", "stride": 5, "integration": "multihead"},
    "fixed-interleaved": {"pattern": "fixed", "stride": 5, "c": 2, "num_verts": 2, "integration": "interleaved"},
    "fixed-multihead": {"pattern": "fixed", "stride": 5, "c": 2, "num_verts": 2, "integration": "multihead"},
    "fixed-half-qk": {"pattern": "fixed", "stride": 5, "c": 1, "num_verts": 2, "qk_ratio": 0.5},
    "strided-half-qk": {"pattern": "strided", "stride": 4, "qk_ratio": 0.5, "integration": "multihead"},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: decoding runs on one thread


def tiny(n: int = N, data_dir: str = "", **model) -> tuple[SparseTransformer, Config]:
    """A 2-layer, 4-head model with random weights (the zero W_out made random, so samples vary)."""
    kw = {"n_layer": 2, "d_model": 32, "n_head": 4, "backend": "reference"} | model
    cfg = validate(Config(model=ModelConfig(**kw), data=DataConfig(dir=data_dir, seq_len=n)))
    torch.manual_seed(0)
    m = SparseTransformer(cfg.model)
    with torch.no_grad():
        m.head.weight.normal_(0.0, 1.0)
    return m.eval(), cfg


@torch.no_grad()
def full_forward(name):
    """``tiny``'s model of ``PATTERNS[name]``, a random batch ``x`` of 2 x N tokens and the logits of
    one forward pass over it."""
    model, _cfg = tiny(**PATTERNS[name])
    x = torch.randint(0, 256, (2, N))
    return model, x, model(x)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cached_decoding_matches_full_forward(name):
    model, x, full = full_forward(name)
    with torch.no_grad():
        cache = model.new_cache(2)
        steps = [model.decode_step(x[:, i - 1] if i else None, i, cache) for i in range(N)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cache_reads_exactly_the_pattern_keys(name):
    """Follow each layout's writes with position numbers: at every step the slots a query attends to
    (bias 0) hold exactly the keys the pattern gives that head, each once."""
    model, _ = tiny(**PATTERNS[name])
    cache = model.new_cache(1)
    for block, layer in zip(model.blocks, cache.layers):
        pattern = block.attn.pattern
        for group in layer.groups:
            layout = group.layout
            heads = torch.arange(model.cfg.n_head)
            heads = (heads if group.heads is None else heads[group.heads]).tolist()
            masks = {h: pattern.mask(N, h) for h in heads}
            held = torch.full((layout.slots,), -1)  # the position each slot holds
            for i in range(N):
                index = layout.step(torch.tensor([i]))
                held[index.write] = i
                read = torch.arange(layout.slots) if index.read is None else index.read
                got = sorted(held[read][index.bias == 0].tolist())
                for h in heads:
                    assert got == masks[h][i].nonzero().view(-1).tolist(), (name, h, i)


def test_fixed_cache_holds_only_the_current_block_and_summaries():
    n, l, c = 1000, 32, 4
    model, _ = tiny(n=n, d_model=16, n_head=4, pattern="fixed", stride=l, c=c, num_verts=2)
    cache = model.new_cache(3)
    per_head = l + c * math.ceil(n / l) + 1  # block, summary cells, one spare slot: 161 keys, not 1000
    for layer in cache.layers:
        assert len(layer.groups) == 2  # two summary offsets
        for g in layer.groups:
            assert g.layout.compact
            assert g.k.shape == (3 * 2, per_head, 4) and g.v.shape == (3 * 2, per_head, 4)
    assert cache.nbytes == 2 * 3 * 4 * per_head * (4 * 4 + 4 * 4)
    assert cache.nbytes / cache.dense_nbytes == pytest.approx(per_head / n)


@pytest.mark.parametrize("n", [4096, 1000])
def test_strided_cache_is_no_larger_than_dense(n):
    """The stride term keeps every key; the local band reads the same buffer instead of a ring."""
    model, _ = tiny(n=n, d_model=16, n_head=2, pattern="strided", stride=64)
    cache = model.new_cache(1)
    assert cache.nbytes == cache.dense_nbytes
    model, _ = tiny(n=n, d_model=16, n_head=2, pattern="strided", stride=64, integration="multihead")
    band, stride = model.new_cache(1).layers[0].groups  # even heads: local band; odd heads: stride
    assert band.layout.compact and band.k.shape[1] == 64
    assert not stride.layout.compact and stride.k.shape[1] == n


@pytest.mark.parametrize("name", list(PATTERNS))
def test_no_cache_is_larger_than_dense(name):
    for n in (3, 5, 6, N, 64):
        model, _ = tiny(n=n, **PATTERNS[name])
        cache = model.new_cache(2, device="meta")
        assert cache.nbytes <= cache.dense_nbytes, n


@pytest.mark.parametrize("name", list(PATTERNS))
def test_prefill_then_decoding_matches_full_forward(name):
    """A prefix fed in one forward pass fills the cache as decoding it position by position would."""
    model, x, full = full_forward(name)
    with torch.no_grad():
        for P in (1, 4, 5, 11, N - 1):  # shorter and longer than the stride 5 (ring buffers wrap)
            cache = model.new_cache(2)
            pre = model(x[:, :P], cache)
            steps = [model.decode_step(x[:, i - 1], torch.tensor([i]), cache) for i in range(P, N)]
            torch.testing.assert_close(torch.cat([pre, torch.stack(steps, 1)], 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_greedy_samples_match_full_forward(name):
    """Greedy decoding with the cache picks, at every position, the argmax of the full forward pass."""
    model, cfg = tiny(**PATTERNS[name])
    for prefix in (None, torch.tensor([72, 105, 33], dtype=torch.uint8)):
        out = generate(model, cfg, num=2, length=N, top_k=1, prefix=prefix)
        with torch.no_grad():
            greedy = model(out).argmax(-1)
        P = 0 if prefix is None else len(prefix)
        assert torch.equal(out[:, P:], greedy[:, P:]), (name, P)


def test_batched_samples_equal_samples_drawn_one_by_one():
    model, cfg = tiny(**PATTERNS["fixed-multihead"])
    prefixes = torch.randint(0, 256, (3, 4))
    batched = generate(model, cfg, num=3, length=N, top_k=1, prefix=prefixes)
    rows = [generate(model, cfg, num=1, length=N, top_k=1, prefix=p) for p in prefixes]
    assert torch.equal(batched, torch.cat(rows))
    x = torch.randint(0, 256, (3, N))
    with torch.no_grad():
        caches = [model.new_cache(3)] + [model.new_cache(1) for _ in range(3)]
        for i in range(N):
            pos = torch.tensor([i])
            both = model.decode_step(x[:, i - 1], pos, caches[0])
            one = torch.cat([model.decode_step(x[b : b + 1, i - 1], pos, caches[1 + b]) for b in range(3)])
            torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-5)


def test_decoder_step_is_fixed_shape_and_advances_the_position():
    """The step reads the position from its device tensor: no Python int, no new shapes."""
    model, _cfg = tiny(**PATTERNS["strided-both"])
    with torch.inference_mode():
        tokens = torch.zeros(2, N, dtype=torch.long)
        tokens[:, :3] = torch.tensor([1, 2, 3])
        decoder = Decoder(model, tokens, temperature=0.0)
        decoder.prefill(3)
        shapes = set()
        for i in range(3, N):
            assert decoder.pos.item() == i
            shapes.add(tuple(decoder.step().shape))
            index = decoder.cache.step(decoder.pos)
            layer = index.layers[0]
            shapes.add(tuple(t.shape for t in (index.layouts[0].write, index.layouts[0].bias, layer.write, layer.read)))
        assert len(shapes) == 2 and decoder.pos.item() == N
        assert torch.equal(tokens[:, :3], torch.tensor([[1, 2, 3]] * 2))
        with pytest.raises(ValueError, match="CUDA graphs"):
            Decoder(model, tokens, graphs=True)


def test_decode_step_rejects_positions_outside_the_cache():
    model, _cfg = tiny(**PATTERNS["local"])
    with pytest.raises(ValueError, match="outside the cache"):
        model.decode_step(torch.zeros(1, dtype=torch.long), 5, model.new_cache(1, length=5))
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.zeros(1, 6, dtype=torch.long), model.new_cache(1, length=5))


def test_failed_compile_falls_back_to_the_plain_step(monkeypatch):
    def broken(fn, **kwargs):
        def compiled():
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    model, cfg = tiny(**PATTERNS["strided-both"])
    with torch.inference_mode(), pytest.warns(UserWarning, match="decoding uncompiled"):
        tokens = torch.zeros(2, N, dtype=torch.long)
        decoder = Decoder(model, tokens, temperature=0.0, compile=True)
    assert not decoder.compiled
    with torch.inference_mode():
        for _ in range(N):
            decoder.step()
    assert torch.equal(tokens, generate(model, cfg, num=2, length=N, top_k=1))


@pytest.mark.slow
def test_compiled_step_equals_plain_step():
    """torch.compile of the whole step (no graph break) decodes the same logits and bytes (CPU)."""
    model, _cfg = tiny(**PATTERNS["fixed-multihead"])
    runs = []
    with torch.inference_mode():
        for compile in (False, True):
            tokens = torch.zeros(2, N, dtype=torch.long)
            noise = torch.empty(8, 2, 256).exponential_(generator=torch.Generator().manual_seed(0))
            decoder = Decoder(model, tokens, noise=noise, compile=compile)
            assert decoder.compiled == compile
            runs.append((torch.stack([decoder.step().clone() for _ in range(N)], 1), tokens))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(runs[0][1], runs[1][1])


def test_generate_keeps_prefix_and_top_k_1_is_greedy():
    model, cfg = tiny(**PATTERNS["fixed-both"])
    prefix = torch.tensor([72, 105, 33, 10], dtype=torch.uint8)
    out = generate(model, cfg, num=3, length=N, top_k=1, prefix=prefix)
    assert out.shape == (3, N) and out.dtype == torch.long
    assert (out[:, :4] == prefix.long()).all()
    with torch.no_grad():
        greedy = model(out).argmax(-1)
    assert torch.equal(out[:, 4:], greedy[:, 4:])
    assert torch.equal(generate(model, cfg, 3, N, temperature=0.0, prefix=prefix), out)
    rows = torch.randint(0, 256, (3, 6))
    assert torch.equal(generate(model, cfg, 3, N, prefix=rows, seed=1)[:, :6], rows)


def test_generate_with_and_without_cache_agree_and_seed_reproduces():
    model, cfg = tiny(**PATTERNS["strided-multihead"])
    a = generate(model, cfg, num=2, length=N, seed=7)
    b = generate(model, cfg, num=2, length=N, seed=7, use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(a, generate(model, cfg, num=2, length=N, seed=7))
    assert not torch.equal(a, generate(model, cfg, num=2, length=N, seed=8))


def test_top_k_samples_only_the_k_largest():
    model, cfg = tiny(**PATTERNS["dense"])
    out = generate(model, cfg, num=4, length=N, top_k=3, seed=0)
    with torch.no_grad():
        top3 = model(out).topk(3, dim=-1).indices
    assert (top3 == out.unsqueeze(-1)).any(-1).all()


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    freq = lambda t: torch.bincount(sample_logits(logits, t, generator=g), minlength=4).float() / 4000
    p1 = torch.softmax(logits[0], -1)
    torch.testing.assert_close(freq(1.0), p1, atol=0.03, rtol=0)
    assert freq(0.1)[0] > 0.99  # cold: nearly greedy
    assert freq(100.0).min() > 0.2  # hot: nearly uniform
    cut = torch.bincount(sample_logits(logits, 1.0, top_k=2, generator=g), minlength=4)
    assert cut[2:].sum() == 0 and cut[:2].min() > 0


def test_generate_rejects_bad_lengths():
    model, cfg = tiny(**PATTERNS["local"])
    with pytest.raises(ValueError, match="n_ctx"):
        generate(model, cfg, 1, N + 1)
    with pytest.raises(ValueError, match="prefix"):
        generate(model, cfg, 1, 4, prefix=torch.zeros(5, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------
# sample_command: files of the right kind and size
# --------------------------------------------------------------------------------------------


def _data_dir(tmp_path, modality, shape=None, sample_rate=None, record_len=None):
    """A minimal prepared data folder that read_meta accepts."""
    splits = dict.fromkeys(("train", "val", "test"), bytes(record_len or 100))
    return str(
        write_prepared(tmp_path / "data", splits, modality, record_len=record_len, shape=shape, sample_rate=sample_rate)
    )


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """Make ``checkpoint.load_model`` return a given tiny model (checkpoint.py is tested elsewhere)."""

    def use(model, cfg):
        fake = types.ModuleType("sparse_transformer.checkpoint")
        fake.load_model = lambda run_dir, device="cpu": (model.to(device), cfg)
        monkeypatch.setitem(sys.modules, "sparse_transformer.checkpoint", fake)
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        return run

    return use


def test_sample_command_image_grid(fake_run, tmp_path, capsys):
    H, W, C = 4, 3, 3
    data = _data_dir(tmp_path, "image", shape=[H, W, C], record_len=H * W * C)
    model, cfg = tiny(
        n=H * W * C,
        data_dir=data,
        pattern="strided",
        stride=W * C,
        integration="multihead",
        position="image",
        image_shape=[H, W, C],
    )
    run = fake_run(model, cfg)
    prefix = tmp_path / "top_row.bin"
    prefix.write_bytes(bytes(range(10, 10 + W * C)))
    paths = sample_command(run, num=5, temperature=1.0, top_k=0, prefix_file=prefix, out_dir=None, device="cpu")
    assert paths == [run / "samples" / "samples.png"]
    img = Image.open(paths[0])
    assert img.mode == "RGB" and img.size == (3 * W, 2 * H)  # 5 samples: 3 columns, 2 rows
    grid = np.asarray(img)
    for n in range(5):
        r, c = divmod(n, 3)
        assert grid[r * H, c * W : (c + 1) * W].ravel().tolist() == list(range(10, 10 + W * C))
    assert "tokens/s" in capsys.readouterr().out


def test_sample_command_audio_wav(fake_run, tmp_path):
    data = _data_dir(tmp_path, "audio", sample_rate=8000)
    model, cfg = tiny(n=N, data_dir=data, **PATTERNS["strided-both"])
    run = fake_run(model, cfg)
    paths = sample_command(
        run, num=2, temperature=1.0, top_k=0, prefix_file=None, out_dir=tmp_path / "wav", length=20, device="cpu"
    )
    assert [p.name for p in paths] == ["sample_000.wav", "sample_001.wav"]
    for p in paths:
        with wave.open(str(p)) as f:
            assert (f.getnframes(), f.getframerate(), f.getnchannels()) == (20, 8000, 1)


def test_sample_command_text(fake_run, tmp_path):
    model, cfg = tiny(**PATTERNS["fixed-both"])
    run = fake_run(model, cfg)
    paths = sample_command(
        run, num=3, temperature=0.8, top_k=40, prefix_file=None, out_dir=tmp_path / "txt", seed=3, device="cpu"
    )
    assert [p.suffix for p in paths] == [".txt"] * 3
    assert all(p.stat().st_size == N for p in paths)


# --------------------------------------------------------------------------------------------
# CUDA: the captured step (CUDA graph) against the eager step and the full forward pass
# --------------------------------------------------------------------------------------------


def _decode_all(model, n, graphs, compile=False, temperature=0.0, seed=0):
    """Logits ``[2, n, V]`` (fp32) and bytes ``[2, n]`` of a Decoder run from position 0."""
    tokens = torch.zeros(2, n, dtype=torch.long, device="cuda")
    noise = None
    if temperature > 0:
        noise = torch.empty(16, 2, 256, device="cuda").exponential_(generator=torch.Generator("cuda").manual_seed(seed))
    decoder = Decoder(model, tokens, temperature=temperature, noise=noise, graphs=graphs, compile=compile)
    assert (decoder.graph is not None) == graphs and decoder.compiled == compile  # no fallback
    logits = torch.stack([decoder.step().float().clone() for _ in range(n)], 1)
    return logits, tokens


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dense", "strided-both", "strided-multihead", "fixed-both", "fixed-summary"])
def test_cuda_graph_step_matches_eager_step_and_full_forward(name):
    n = 64
    model32, _cfg = tiny(n=n, **PATTERNS[name] | {"stride": 8})
    model32 = model32.cuda()
    model = copy.deepcopy(model32).to(torch.bfloat16)
    with torch.inference_mode():
        graph_logits, graph_tokens = _decode_all(model, n, graphs=True)
        eager_logits, eager_tokens = _decode_all(model, n, graphs=False)
        # the replayed graph runs the eager step's kernels: the same logits and bytes
        torch.testing.assert_close(graph_logits, eager_logits, atol=0, rtol=0)
        assert torch.equal(graph_tokens, eager_tokens)
        # against the full forward pass over the decoded bytes: no further from fp32 than the bf16
        # full forward pass itself is (twice its error, as the attention tests judge backends)
        exact = model32(graph_tokens)
        bf16_error = (model(graph_tokens).float() - exact).abs().max()
        assert (graph_logits - exact).abs().max() <= 2 * bf16_error + 1e-3
        # sampling: the same seed draws the same bytes in the graph and eagerly
        _, a = _decode_all(model, n, graphs=True, temperature=1.0)
        _, b = _decode_all(model, n, graphs=False, temperature=1.0)
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_eager_step_never_syncs_with_the_host():
    model, _cfg = tiny(n=64, **PATTERNS["fixed-multihead"] | {"stride": 8})
    model = model.cuda()
    with torch.inference_mode():
        tokens = torch.zeros(2, 64, dtype=torch.long, device="cuda")
        decoder = Decoder(model, tokens, temperature=0.0)
        decoder.step()  # first call: lazy initialization may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(10):
                decoder.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_generate_on_cuda_matches_cpu_greedy():
    """generate captures the step in a CUDA graph by default (prefix fed by prefill)."""
    model, cfg = tiny(**PATTERNS["strided-multihead"])
    cpu = generate(model, cfg, num=3, length=N, top_k=1, prefix=torch.tensor([1, 2, 3]))
    gpu = generate(model.cuda(), cfg, num=3, length=N, top_k=1, prefix=torch.tensor([1, 2, 3]))
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.slow
def test_compiled_cuda_graph_step_matches_full_forward():
    n = 64
    model, _cfg = tiny(n=n, **PATTERNS["strided-multihead"] | {"stride": 8})
    model = model.cuda()
    with torch.inference_mode():
        logits, tokens = _decode_all(model, n, graphs=True, compile=True)
        torch.testing.assert_close(logits, model(tokens), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decoding(dtype):
    """bf16 keeps bf16 keys, fp16 keeps fp32 keys (fp16 q·k can overflow); either way decoding is no
    further from the fp32 model than the full forward pass in that dtype (twice its error)."""
    model32, _cfg = tiny(**PATTERNS["fixed-multihead"])
    model = copy.deepcopy(model32).to(dtype)
    x = torch.randint(0, 256, (2, N))
    with torch.no_grad():
        exact = model32(x)
        error = (model(x).float() - exact).abs().max()
        cache = model.new_cache(2)
        assert {g.k.dtype for layer in cache.layers for g in layer.groups} == {
            torch.float32 if dtype == torch.float16 else dtype
        }
        assert {g.v.dtype for layer in cache.layers for g in layer.groups} == {dtype}
        steps = torch.stack([model.decode_step(x[:, i - 1], i, cache).float() for i in range(N)], 1)
    assert (steps - exact).abs().max() <= 2 * error


@pytest.mark.parametrize("name, selects", [("strided-multihead", 2), ("fixed-multihead", 2), ("fixed-both", 4)])
def test_all_head_groups_of_a_layer_attend_in_one_call(name, selects):
    """A layer with several head groups dispatches the same attention ops as a layer with one: one
    scatter per buffer, one gather, one scores product, one softmax, one product with the values
    (fixed-both also selects its keys and values once more: two slots per head are written)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model, _ = tiny(**PATTERNS[name])
    cache = model.new_cache(2)
    assert len(cache.layers[0].groups) >= 2
    step = cache.step(torch.tensor([7]))
    h = torch.zeros(2, 1, model.cfg.d_model)
    with torch.no_grad(), Count() as count:
        model.blocks[0](h, cache.layers[0], step)
    for op, times in {
        "index_copy_": 2,
        "index_select": selects,
        "baddbmm": 1,
        "_softmax": 1,
        "bmm": 1,
        "cat": 0,
    }.items():
        assert count.ops.count(op) == times, (op, count.ops)
