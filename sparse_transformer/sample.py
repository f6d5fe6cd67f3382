"""Sampling: KV-cached autoregressive generation, and ``sparse-transformer sample`` (.txt/.png/.wav).

``generate`` draws ``num`` samples in one batch, gpt-fast style:

1. prefill: a prefix (a text prompt, the top rows of an image) is fed in one parallel forward pass
   of the model, which also fills the sparse KV cache (:meth:`SparseTransformer.forward` with a cache);
2. decoding: one :class:`Decoder` step per position computes the logits from the cache
   (:meth:`SparseTransformer.decode_step`), draws the next byte and advances the position. The step
   has fixed shapes, the position is a device tensor and nothing syncs with the host, so on CUDA
   the step is captured once in a CUDA graph and replayed (optionally compiled by
   ``torch.compile`` first, which fuses its small kernels).

A draw is ``argmax(p / E)`` with ``E ~ Exp(1)``, an exact categorical sample that never waits for the
device. The noise ``E`` is drawn from the seeded generator for ``NOISE_STEPS`` steps at a time, outside
the captured step, so the eager, captured and uncached paths draw the same bytes from the same seed.
``use_cache=False`` runs the full forward pass over the whole prefix at every step instead: the same
distribution, O(n) times slower; it is the baseline of ``sparse-transformer bench sample``.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import SEED_MAX, Config, data_meta
from .errors import UserError
from .paths import atomic_output, check_output_dir, check_run_dir

__all__ = [
    "GREEDY_BELOW",
    "NOISE_STEPS",
    "Decoder",
    "generate",
    "is_greedy",
    "sample_command",
    "sample_logits",
    "write_samples",
]

NOISE_STEPS = 256  # decoding steps whose sampling noise is drawn at once
# Temperatures below the smallest normal fp32 number are greedy: fp32 logits cannot be divided by them.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


def is_greedy(temperature: float, top_k: int = 0) -> bool:
    """Whether :func:`sample_logits` takes the argmax for ``temperature`` and ``top_k``: ``top_k == 1``,
    or a temperature below :data:`GREEDY_BELOW` (0, negative, or too small to divide by in fp32:
    there the limit of the distribution is the argmax)."""
    return top_k == 1 or temperature < GREEDY_BELOW


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits [B, V]`` -> ``[B]`` int64.

    ``top_k == 1`` or a temperature below :data:`GREEDY_BELOW` (0 and negative values included) is
    greedy (argmax); ``top_k > 1`` keeps the ``top_k`` largest logits (``top_k <= 0``: all). The
    logits are shifted so that their maximum is 0 before dividing by the temperature, so a tiny
    positive temperature gives the largest logit probability 1 (ties share it), never ``inf - inf``
    = NaN. The draw is ``argmax(p / E)`` with ``E ~ Exp(1)``, which samples ``p`` exactly and, unlike
    ``torch.multinomial``, never waits for the device. ``noise [B, V]``: the ``E`` to use (else drawn
    from ``generator``, or the global RNG when None).

    Raises:
        ValueError: a temperature that is NaN or infinite.
    """
    if not math.isfinite(temperature):
        raise ValueError(
            f"temperature {temperature} must be a finite number (0 = greedy, 1 = the model's distribution)"
        )
    if is_greedy(temperature, top_k):
        return logits.argmax(-1)
    logits = logits.float()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # <= 0, the largest exactly 0
    probs = torch.softmax(logits, dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


class Decoder:
    """Samples ``tokens [B, L]`` position by position with the sparse KV cache, one fixed-shape step
    per position (autoregressive sampling of the model of paper §5, as for the samples of its §7.3-7.4).

    A step reads the byte at ``pos - 1``, computes the logits of position ``pos`` from the cache,
    draws a byte into ``tokens[:, pos]`` and adds one to ``pos`` (an int64 ``[1]`` device tensor).
    The cache, the tokens and the position are allocated here; a step only makes intermediates of
    fixed shapes (from the graph's own memory when replayed) and never syncs with the host.

    Args:
        model: a :class:`~sparse_transformer.model.SparseTransformer` in eval mode.
        tokens: ``[B, L]`` int64 on the model's device: the output; a prefix is written by the caller
            before :meth:`prefill`.
        temperature, top_k: see :func:`sample_logits`.
        noise: ``[S, B, V]`` fp32 Exp(1) noise, row ``pos mod S`` used at ``pos`` (None: greedy).
        graphs: capture the step in a CUDA graph (CUDA only; ValueError elsewhere).
        compile: ``torch.compile`` the step first (inductor, whole graph).
        fused: attend with the fused Triton decode kernel, one launch per layer (None: on CUDA;
            see :meth:`~sparse_transformer.model.SparseTransformer.new_cache`).
        fused_linear: run each block's projections with their norm, GeLU and residual as fused
            Triton kernels too (None: on CUDA; see
            :meth:`~sparse_transformer.model.SparseTransformer.new_cache`).

    If compiling or capturing fails, the decoder warns and falls back to the plain step.
    """

    def __init__(
        self,
        model,
        tokens: torch.Tensor,
        temperature: float = 1.0,
        top_k: int = 0,
        noise: torch.Tensor | None = None,
        graphs: bool = False,
        compile: bool = False,
        fused: bool | None = None,
        fused_linear: bool | None = None,
    ):
        if graphs and tokens.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; tokens are on {tokens.device} (use graphs=False)")
        self.model, self.tokens, self.noise = model, tokens, noise
        self.temperature, self.top_k = temperature, top_k
        self.cache = model.new_cache(tokens.shape[0], tokens.shape[1], fused=fused, fused_linear=fused_linear)
        self.pos = torch.zeros(1, dtype=torch.long, device=tokens.device)
        self.graph, self.graph_logits = None, None
        self.compiled = compile  # False again if compiling fails
        self.step_fn = self._step
        if compile:
            self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        if graphs:
            self._capture()
        elif compile:
            self._warm_up(None)
            self._reset()

    def _step(self) -> torch.Tensor:
        pos, tokens = self.pos, self.tokens
        prev = tokens.index_select(1, (pos - 1).clamp(min=0)).view(-1)
        logits = self.model.decode_step(prev, pos, self.cache)
        noise = None if self.noise is None else self.noise.index_select(0, pos % self.noise.shape[0])[0]
        tokens.index_copy_(1, pos, sample_logits(logits, self.temperature, self.top_k, noise=noise).view(-1, 1))
        pos.add_(1)
        return logits

    def _reset(self) -> None:
        self.pos.zero_()
        self.cache.zero_()
        self.tokens.zero_()

    def _warm_up(self, stream) -> None:
        """Run (and, when compiling, compile) the step a few times at position 0 on ``stream`` (None:
        the current one); the state is left dirty for :meth:`_reset`."""
        try:
            with torch.cuda.stream(stream) if stream is not None else _nothing():
                for _ in range(3):
                    self.pos.zero_()
                    self.step_fn()
        except Exception as e:  # a compiler error: keep the plain step
            if not self.compiled:
                raise
            warnings.warn(
                f"torch.compile of the decoding step failed ({type(e).__name__}: {e}); decoding uncompiled",
                stacklevel=2,
            )
            self.compiled, self.step_fn = False, self._step

    def _capture(self) -> None:
        """Warm up on a side stream and capture one step in a CUDA graph (as the CUDA graphs notes of
        PyTorch require), then clear the state the warm-up wrote."""
        stream = torch.cuda.Stream(self.tokens.device)
        stream.wait_stream(torch.cuda.current_stream(self.tokens.device))
        self._warm_up(stream)
        torch.cuda.current_stream(self.tokens.device).wait_stream(stream)
        self._reset()
        stream.wait_stream(torch.cuda.current_stream(self.tokens.device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                logits = self.step_fn()
        except Exception as e:  # noqa: BLE001 - e.g. an operation that cannot be captured: decode eagerly
            warnings.warn(
                f"CUDA graph capture of the decoding step failed ({type(e).__name__}: {e}); decoding eagerly",
                stacklevel=2,
            )
            torch.cuda.synchronize(self.tokens.device)
        else:
            self.graph, self.graph_logits = graph, logits
        self._reset()

    def prefill(self, length: int) -> None:
        """Feed ``tokens[:, :length]`` in one parallel forward pass (filling the cache for positions
        ``0 .. length-1``) and continue decoding at ``length``."""
        if length:
            self.model(self.tokens[:, :length], self.cache)
        self.pos.fill_(length)

    def step(self) -> torch.Tensor:
        """Decode one position: returns its logits ``[B, V]`` (overwritten by the next step when the
        step is a replayed CUDA graph; clone to keep)."""
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits
        return self.step_fn()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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
    graphs: bool | None = None,
    compile: bool = False,
) -> torch.LongTensor:
    """Sample ``num`` sequences of ``length`` bytes from ``model``, all ``num`` in one batch.

    Args:
        model: a :class:`~sparse_transformer.model.SparseTransformer` (put in eval mode for the call).
        cfg: its config (``cfg.model.n_ctx`` bounds ``length``).
        num, length: batch size and bytes per sample (``1 <= length <= n_ctx``).
        temperature, top_k: see :func:`sample_logits` (paper: temperature 1, no top-k).
        prefix: ``[P]`` or ``[num, P]`` bytes that fix the first ``P`` positions (completions, e.g.
            the top half of an image); fed in one forward pass (prefill), kept in the output.
        device: the device the model is on (default: found from its parameters).
        use_cache: decode with the sparse KV cache (True, the default; on CPU the decoding then runs
            with one intra-op thread, faster for its small operations) or with a full forward pass
            per step (False).
        seed: seed of the sampling generator; None draws from the global RNG.
        graphs: replay the decoding step as a CUDA graph (None: on CUDA; True elsewhere raises
            ValueError); a failed capture warns and decodes eagerly.
        compile: ``torch.compile`` the decoding step (worth its compile time for long samples on CUDA).
    Returns:
        ``[num, length]`` int64 bytes on ``device``.
    Raises:
        ValueError: a length outside ``1..n_ctx``, ``num < 1``, a NaN or infinite temperature, a bad
            prefix, graphs off CUDA.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if not 1 <= length <= cfg.model.n_ctx:
        raise ValueError(f"sample length {length} must be in 1..n_ctx = {cfg.model.n_ctx}")
    if num < 1:
        raise ValueError(f"num = {num} samples; ask for at least 1")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature {temperature} must be a finite number (0 = greedy)")
    graphs = use_cache and device.type == "cuda" if graphs is None else graphs
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    prefix = _prefix_rows(prefix, num, length, device)
    P = 0 if prefix is None else prefix.shape[1]
    greedy = is_greedy(temperature, top_k)
    vocab = model.head.out_features
    noise = None if greedy else torch.empty(min(NOISE_STEPS, length), num, vocab, device=device)

    was_training = model.training
    model.eval()
    out = torch.zeros(num, length, dtype=torch.long, device=device)
    threads = torch.get_num_threads()
    if use_cache and device.type == "cpu":
        # A decode step is a few dozen tiny ops; more intra-op threads only add synchronization
        # (measured on 2 busy cores: 2,000 tokens/s with one thread, 9 with two).
        torch.set_num_threads(1)
    try:
        decoder = Decoder(model, out, temperature, top_k, noise, graphs, compile) if use_cache else None
        if P:
            out[:, :P] = prefix
        if decoder is not None:
            decoder.prefill(P)
        for i in range(P, length):
            if noise is not None and (i == P or i % noise.shape[0] == 0):
                noise.exponential_(1.0, generator=generator)  # outside the (captured) step
            if decoder is not None:
                decoder.step()
            else:  # position i reads only bytes 0..i-1 (shifted input): out[:, i] is a placeholder
                logits = model(out[:, : i + 1])[:, i]
                row = None if noise is None else noise[i % noise.shape[0]]
                out[:, i] = sample_logits(logits, temperature, top_k, noise=row)
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


def _first_free(out_dir: Path, stem: str, suffix: str) -> int:
    """The index after every ``{stem}NNN{suffix}`` file already in ``out_dir`` (0 when there is none):
    new samples are numbered from there, so that earlier ones are never overwritten."""
    taken = [
        int(p.name[len(stem) : -len(suffix)])
        for p in out_dir.glob(f"{stem}*{suffix}")
        if p.name[len(stem) : -len(suffix)].isdigit()
    ]
    return max(taken) + 1 if taken else 0


def write_samples(samples: np.ndarray, meta: dict, out_dir: str | Path) -> list[Path]:
    """Write ``uint8 [num, length]`` samples as the data's modality: text -> ``sample_000.txt``, ...
    (raw bytes); image -> one ``samples.png`` grid (raster order, channel fastest); audio ->
    ``sample_000.wav``, ... (mu-law decoded, ``meta["sample_rate"]``). Files already in ``out_dir``
    are kept: new ones are numbered after them (``sample_003.txt``, ``samples_001.png``). Returns the
    written paths."""
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
        if path.exists():
            path = out_dir / f"samples_{max(1, _first_free(out_dir, 'samples_', '.png')):03d}.png"
        with atomic_output(path) as tmp:
            image_grid(samples.reshape(-1, H, W, C)).save(tmp)
        return [path]
    paths = []
    suffix = ".wav" if modality == "audio" else ".txt"
    first = _first_free(out_dir, "sample_", suffix)
    for n, s in enumerate(samples, first):
        path = out_dir / f"sample_{n:03d}{suffix}"
        with atomic_output(path) as tmp:  # a full disk leaves no truncated sample behind
            if modality == "audio":
                from .data.mulaw import write_wav

                write_wav(tmp, s, meta["sample_rate"])
            else:
                tmp.write_bytes(s.tobytes())
        paths.append(path)
    return paths


def _check_sample_args(num, temperature, top_k, length, seed=None) -> None:
    """The command's own checks, before anything is loaded (UserError, one line each)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise UserError(f"sample: --num {num}; ask for at least 1 sample (an integer)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise UserError(f"sample: --temperature {temperature} is not a finite number; use 0 (greedy) to 1 or more")
    if temperature < 0:
        raise UserError(
            f"sample: --temperature {temperature} is negative; use 0 for greedy sampling, 1 for the "
            "model's distribution"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"sample: --top-k {top_k} must be an integer >= 0 (0 = no truncation, 1 = greedy)")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise UserError(f"sample: --length {length} must be a positive integer (or 0 for the model's context)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise UserError(f"sample: --seed {seed} must be an integer from 0 to 2**63 - 1")


def sample_command(
    run: str | Path,
    num: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    prefix_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    length: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    graphs: bool | None = None,
    compile: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[Path]:
    """``sparse-transformer sample``: load the model of run directory ``run``, draw ``num`` samples of
    ``length`` bytes in one batch (0 = the model's context; a prefix counts in it) and write them to
    ``out_dir`` (default ``run/samples``) as text, one PNG grid or WAV files, following the data's
    ``meta.json`` (the embedded default data set is text); the samples are not printed.
    ``prefix_file``: its raw bytes condition the first positions (for images: the first rows in
    raster order), fed in one forward pass. ``graphs``, ``compile``: see :func:`generate`. The
    weights are cast to the run's ``train.dtype`` (``auto``: bf16 on CUDA, fp32 on CPU). Prints the
    drawn tokens per second (prefix bytes not counted); the command line then prints the written
    paths. A temperature of 0, or one too small to divide by (below :data:`GREEDY_BELOW`), samples
    greedily.

    ``num``, ``temperature``, ``top_k``, ``length`` and ``seed`` left as None take the run's
    ``SampleConfig`` (config.json's ``sample`` section), after ``overrides`` (``["--sample.top_k",
    "40"]``, the sample section only) are applied to it; given values win over both.

    Returns: the written paths.
    Raises:
        UserError: before the run is loaded, ``num < 1``, a negative, NaN or infinite temperature,
            ``top_k < 0``, ``length < 0`` or a prefix path that is no file; after, a sample length
            that is not in ``1..n_ctx`` or a prefix longer than it.
    """
    run = Path(run)
    given = {"num": num, "temperature": temperature, "top_k": top_k, "length": length, "seed": seed}
    given = {key: value for key, value in given.items() if value is not None}
    checked = {"num": 1, "temperature": 1.0, "top_k": 0, "length": 0, "seed": None}
    _check_sample_args(**{key: given.get(key, default) for key, default in checked.items()})
    bad = [a for a in overrides if a.startswith("--") and not a.startswith("--sample.")]
    if bad:
        raise UserError(f"sample: {bad[0]} cannot be changed when sampling; only --sample.KEY VALUE overrides apply")
    prefix_path = None
    if prefix_file is not None:
        prefix_path = Path(prefix_file)
        if not prefix_path.is_file():
            raise UserError(
                f"sample: prefix file {prefix_path} does not exist or is not a file; pass a file of raw bytes"
            )
    check_run_dir(run, "sample: --run")
    if out_dir is not None:
        check_output_dir(out_dir, "sample: --out")

    from .checkpoint import load_model
    from .config import apply_overrides
    from .runfolder import inside
    from .runtime import fall_back_backend, resolve_device, resolve_dtype

    dev = resolve_device(device, option="--device")
    model, cfg = load_model(run, dev)
    if out_dir is None:  # inside the run folder, which may come from elsewhere: no link out of it
        inside(run, run / "samples", "sample")
        check_output_dir(run / "samples", "sample: the output folder (--out)")
    apply_overrides(cfg, list(overrides))  # --sample.KEY VALUE over the run's SampleConfig
    num, temperature, top_k, length, seed = (
        given.get(key, getattr(cfg.sample, key)) for key in ("num", "temperature", "top_k", "length", "seed")
    )
    _check_sample_args(num, temperature, top_k, length, seed)
    note = fall_back_backend(model, cfg.model, dev)
    if note:
        print(note, file=sys.stderr)
    model = model.to(resolve_dtype(cfg.train.dtype, dev))  # the run's compute dtype (auto: bf16 on CUDA)
    meta = data_meta(cfg)  # modality, image shape, sample rate: recorded in config.json, else the data's meta.json
    length = length or cfg.sample.length or cfg.model.n_ctx
    if length <= 0:
        raise UserError(
            f"sample: the sample length {length} (from the run's sample.length) must be positive; "
            "pass --length N with N >= 1"
        )
    if length > cfg.model.n_ctx:
        raise UserError(
            f"sample: --length {length} exceeds the model's context {cfg.model.n_ctx}; use at most {cfg.model.n_ctx}"
        )
    prefix = None
    if prefix_path is not None:
        data = prefix_path.read_bytes()
        if len(data) >= length:
            more = "more than" if len(data) > length else "all of"
            raise UserError(
                f"sample: the prefix has {len(data)} bytes, {more} the sample length {length}, which leaves "
                "nothing to sample; shorten it"
            )
        prefix = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None  # empty: no prefix

    t0 = time.perf_counter()
    samples = generate(
        model,
        cfg,
        num,
        length,
        temperature=temperature,
        top_k=top_k,
        prefix=prefix,
        device=dev,
        seed=seed,
        graphs=graphs,
        compile=compile,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    paths = write_samples(samples.to(torch.uint8).cpu().numpy(), meta, out_dir or run / "samples")
    kv = model.new_cache(num, length, device="meta")  # sizes only
    memory = f", peak {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB" if dev.type == "cuda" else ""
    given_bytes = 0 if prefix is None else prefix.numel()
    drawn = f" ({length - given_bytes} drawn after a prefix of {given_bytes})" if given_bytes else ""
    print(
        f"sampled {num} x {length} bytes{drawn} in {seconds:.1f} s: "
        f"{num * (length - given_bytes) / seconds:,.0f} tokens/s on {dev}, "
        f"{str(model.head.weight.dtype).removeprefix('torch.')} "
        f"(KV cache {kv.nbytes / 2**20:.2f} MiB, dense would be {kv.dense_nbytes / 2**20:.2f} MiB{memory})"
    )
    return paths
