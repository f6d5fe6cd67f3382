"""Sampling: KV-cached autoregressive generation, and ``sparse-transformer sample`` (.txt/.png/.wav).

``generate`` decodes one position at a time with the model's sparse KV cache
(:meth:`SparseTransformer.new_cache`, :meth:`SparseTransformer.decode_step`), gpt-fast style: the
cache is allocated once, positions are Python ints, and the next token is drawn without a host sync
(``argmax(probs / Exp(1) noise)`` is an exact categorical sample). ``use_cache=False`` runs the full
forward pass over the whole prefix at every step instead: the same distribution, O(n) times slower;
it is the baseline of ``sparse-transformer bench sample`` and a check of the cache.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config, data_meta
from .errors import UserError

__all__ = ["generate", "sample_command", "sample_logits", "write_samples"]


def sample_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row of ``logits [B, V]`` -> ``[B]`` int64.

    ``temperature <= 0`` or ``top_k == 1`` is greedy (argmax); ``top_k > 1`` keeps the ``top_k``
    largest logits. The draw is ``argmax(p / E)`` with ``E ~ Exp(1)``, which samples ``p`` exactly
    and, unlike ``torch.multinomial``, never waits for the device.
    """
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def _prefix_rows(prefix: torch.Tensor | None, num: int, length: int, device) -> torch.Tensor | None:
    """``prefix [P]`` or ``[num, P]`` -> ``[num, P]`` int64 on ``device`` (None when empty)."""
    if prefix is None:
        return None
    prefix = torch.as_tensor(prefix).to(device=device, dtype=torch.long)
    if prefix.dim() == 1:
        prefix = prefix.unsqueeze(0).expand(num, -1)
    if prefix.dim() != 2 or prefix.shape[0] != num:
        raise ValueError(f"prefix must be [P] or [num={num}, P], got shape {tuple(prefix.shape)}")
    if prefix.shape[1] > length:
        raise ValueError(f"prefix has {prefix.shape[1]} bytes, more than the sample length {length}; shorten it")
    if prefix.numel() and (prefix.min() < 0 or prefix.max() > 255):
        raise ValueError("prefix values must be bytes (0..255)")
    return prefix if prefix.shape[1] else None


@torch.inference_mode()
def generate(
    model,
    cfg: Config,
    num: int,
    length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    prefix: torch.Tensor | None = None,
    device=None,
    use_cache: bool = True,
    seed: int | None = None,
) -> torch.LongTensor:
    """Sample ``num`` sequences of ``length`` bytes from ``model``.

    Args:
        model: a :class:`~sparse_transformer.model.SparseTransformer` (put in eval mode for the call).
        cfg: its config (``cfg.model.n_ctx`` bounds ``length``).
        num, length: batch size and bytes per sample (``1 <= length <= n_ctx``).
        temperature, top_k: see :func:`sample_logits` (paper: temperature 1, no top-k).
        prefix: ``[P]`` or ``[num, P]`` bytes that fix the first ``P`` positions (completions, e.g.
            the top half of an image); they are fed, not sampled, and kept in the output.
        device: the device the model is on (default: found from its parameters).
        use_cache: decode with the sparse KV cache (True; on CPU with one intra-op thread) or a full
            forward pass per step (False).
        seed: seed of the sampling generator; None draws from the global RNG.
    Returns:
        ``[num, length]`` int64 bytes on ``device``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if not 1 <= length <= cfg.model.n_ctx:
        raise ValueError(f"sample length {length} must be in 1..n_ctx = {cfg.model.n_ctx}")
    if num < 1:
        raise ValueError(f"num = {num} samples; ask for at least 1")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    prefix = _prefix_rows(prefix, num, length, device)
    P = 0 if prefix is None else prefix.shape[1]

    was_training = model.training
    model.eval()
    out = torch.zeros(num, length, dtype=torch.long, device=device)
    if P:
        out[:, :P] = prefix
    cache = model.new_cache(num, length) if use_cache else None
    threads = torch.get_num_threads()
    if use_cache and device.type == "cpu":
        # A decode step is a few dozen tiny ops; more intra-op threads only add synchronization
        # (measured on 2 busy cores: 2,000 tokens/s with one thread, 9 with two).
        torch.set_num_threads(1)
    try:
        for i in range(length):
            if use_cache:
                logits = model.decode_step(out[:, i - 1] if i else None, i, cache)
            else:  # position i reads only bytes 0..i-1 (shifted input): out[:, i] is a placeholder
                logits = model(out[:, : i + 1])[:, i]
            if i >= P:
                out[:, i] = sample_logits(logits, temperature, top_k, generator)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    return out


# --------------------------------------------------------------------------------------------
# Writing samples
# --------------------------------------------------------------------------------------------


def image_grid(images: np.ndarray):
    """``uint8 [N, H, W, C]`` (C = 1 or 3) -> one PIL image, a near-square grid (black empty cells)."""
    from PIL import Image

    N, H, W, C = images.shape
    cols = math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    grid = np.zeros((rows * H, cols * W, C), dtype=np.uint8)
    for n, img in enumerate(images):
        r, c = divmod(n, cols)
        grid[r * H : (r + 1) * H, c * W : (c + 1) * W] = img
    return Image.fromarray(grid[:, :, 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")


def write_samples(samples: np.ndarray, meta: dict, out_dir: str | Path) -> list[Path]:
    """Write ``uint8 [num, length]`` samples as the data's modality: text -> ``sample_000.txt``, ...
    (raw bytes); image -> one ``samples.png`` grid (raster order, channel fastest); audio ->
    ``sample_000.wav``, ... (mu-law decoded, ``meta["sample_rate"]``). Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modality = meta.get("modality", "text")
    if modality == "image":
        H, W, C = meta["shape"]
        if samples.shape[1] != H * W * C:
            raise UserError(
                f"sample: an image sample needs length {H * W * C} ({H}x{W}x{C}), got {samples.shape[1]}; use --length 0"
            )
        path = out_dir / "samples.png"
        image_grid(samples.reshape(-1, H, W, C)).save(path)
        return [path]
    paths = []
    for n, s in enumerate(samples):
        if modality == "audio":
            from .data.mulaw import write_wav

            path = out_dir / f"sample_{n:03d}.wav"
            write_wav(path, s, meta["sample_rate"])
        else:
            path = out_dir / f"sample_{n:03d}.txt"
            path.write_bytes(s.tobytes())
        paths.append(path)
    return paths


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"sample: --device {device} but CUDA is not available; use --device cpu")
    return torch.device(device)


def sample_command(
    run: str | Path,
    num: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    prefix_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    length: int = 0,
    seed: int = 0,
    device: str = "auto",
) -> list[Path]:
    """``sparse-transformer sample``: load the model of run directory ``run``, draw ``num`` samples of
    ``length`` bytes (0 = ``cfg.sample.length``, or the model's context when that is 0 too) and write
    them to ``out_dir`` (default ``run/samples``) as text, one PNG grid or WAV files, following the
    data's ``meta.json`` (the embedded default data set is text). ``prefix_file``: its raw bytes
    condition the first positions (for images: the first rows in raster order). Prints tokens/s.

    Returns: the written paths.
    """
    from .checkpoint import load_model

    run = Path(run)
    dev = _resolve_device(device)
    model, cfg = load_model(run, dev)
    meta = data_meta(cfg)  # modality, image shape, sample rate: recorded in config.json, else the data's meta.json
    length = length or cfg.sample.length or cfg.model.n_ctx
    if length > cfg.model.n_ctx:
        raise UserError(
            f"sample: --length {length} exceeds the model's context {cfg.model.n_ctx}; use at most {cfg.model.n_ctx}"
        )
    if num < 1:
        raise UserError(f"sample: --num {num}; ask for at least 1 sample")
    prefix = None
    if prefix_file is not None:
        path = Path(prefix_file)
        if not path.is_file():
            raise UserError(f"sample: prefix file {path} does not exist; pass a file of raw bytes")
        prefix = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        if len(prefix) > length:
            raise UserError(
                f"sample: the prefix has {len(prefix)} bytes, more than the sample length {length}; shorten it"
            )

    t0 = time.perf_counter()
    samples = generate(
        model, cfg, num, length, temperature=temperature, top_k=top_k, prefix=prefix, device=dev, seed=seed
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    paths = write_samples(samples.to(torch.uint8).cpu().numpy(), meta, out_dir or run / "samples")
    kv = model.new_cache(num, length, device="meta")  # sizes only
    memory = f", peak {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB" if dev.type == "cuda" else ""
    print(
        f"sampled {num} x {length} bytes in {seconds:.1f} s: {num * length / seconds:,.0f} tokens/s on {dev} "
        f"(KV cache {kv.nbytes / 2**20:.2f} MiB, dense would be {kv.dense_nbytes / 2**20:.2f} MiB{memory})"
    )
    return paths
