"""Sampling: the sparse KV cache against the full forward pass, generate(), and sample files."""

from __future__ import annotations

import json
import math
import sys
import types
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_transformer.config import Config, DataConfig, ModelConfig, validate
from sparse_transformer.kv_cache import BlockCache, StrideCache, SummaryCache
from sparse_transformer.model import SparseTransformer
from sparse_transformer.sample import generate, sample_command, sample_logits

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


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding is many tiny ops: extra threads only add contention (tests slow down 20x on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(n: int = N, data_dir: str = "", **model) -> tuple[SparseTransformer, Config]:
    """A 2-layer, 4-head model with random weights (the zero W_out made random, so samples vary)."""
    kw = {"n_layer": 2, "d_model": 32, "n_head": 4, "backend": "reference"} | model
    cfg = validate(Config(model=ModelConfig(**kw), data=DataConfig(dir=data_dir, seq_len=n)))
    torch.manual_seed(0)
    m = SparseTransformer(cfg.model)
    with torch.no_grad():
        m.head.weight.normal_(0.0, 1.0)
    return m.eval(), cfg


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cached_decoding_matches_full_forward(name):
    model, _cfg = tiny(**PATTERNS[name])
    x = torch.randint(0, 256, (2, N))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model.decode_step(x[:, i - 1] if i else None, i, cache) for i in range(N)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cache_reads_exactly_the_pattern_keys(name):
    """Every term buffer serves query i exactly as many keys as the term allows."""
    model, _ = tiny(**PATTERNS[name])
    cache = model.new_cache(1)
    for block, layer in zip(model.blocks, cache.layers):
        groups = block.attn.pattern.head_groups(model.cfg.n_head)
        assert len(groups) == len(layer.groups)
        for (terms, _), (_, caches) in zip(groups, layer.groups):
            for term, c in zip(terms, caches):
                reads = [c.read(i)[0].shape[2] for i in range(N)]
                assert reads == term.keys_per_query(np.arange(N)).tolist(), term


def test_fixed_cache_holds_only_the_current_block_and_summaries():
    n, l, c = 1000, 32, 4
    model, _ = tiny(n=n, d_model=16, n_head=4, pattern="fixed", stride=l, c=c, num_verts=2)
    cache = model.new_cache(3)
    for layer in cache.layers:
        assert len(layer.groups) == 2  # two summary offsets
        for _, caches in layer.groups:
            block, summary = caches
            assert isinstance(block, BlockCache) and block.slots == l
            assert isinstance(summary, SummaryCache) and summary.slots == c * math.ceil(n / l)
            assert block.k.shape == (3, 2, l, 4) and summary.v.shape == (3, 2, c * math.ceil(n / l), 4)
    per_head = l + c * math.ceil(n / l)  # 160 keys instead of 1000
    assert cache.nbytes == 2 * 3 * 4 * per_head * (4 * 4 + 4 * 4)
    assert cache.nbytes / cache.dense_nbytes == pytest.approx(per_head / n)


def test_strided_cache_layout():
    n, l = 1000, 32
    model, _ = tiny(n=n, d_model=16, n_head=2, pattern="strided", stride=l, integration="multihead")
    layer = model.new_cache(1).layers[0]
    (_, (band,)), (_, (stride,)) = layer.groups
    assert band.slots == l
    assert isinstance(stride, StrideCache) and stride.k.shape[2:4] == (l, math.ceil(n / l))


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
    d = tmp_path / "data"
    d.mkdir()
    size = record_len or 100
    for split in ("train", "val", "test"):
        (d / f"{split}.bin").write_bytes(bytes(size))
    meta = {
        "kind": modality,
        "modality": modality,
        "record_len": record_len,
        "shape": shape,
        "sample_rate": sample_rate,
        "splits": dict.fromkeys(("train", "val", "test"), size),
        "source": "test",
        "format_version": 1,
    }
    (d / "meta.json").write_text(json.dumps(meta))
    return str(d)


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
