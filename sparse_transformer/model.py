"""The Sparse Transformer (Child et al. 2019, paper §5), one file, top to bottom.

A decoder-only Transformer over bytes (vocabulary 256):

    H_0 = embed(x shifted right, start embedding at position 0) + factorized position embeddings
    H_k = H + a + b,  a = dropout(attn(norm(H))),  b = dropout(ff(norm(H + a)))
    logits = norm(H_N) · W_out

Sampling runs the same blocks with a sparse KV cache that holds only the keys the pattern reads
(``kv_cache.py``): ``forward(x, cache)`` feeds a prefix in one parallel pass and fills the cache
(prefill), ``decode_step`` computes one position from the cache (a fixed sequence of tensor
operations, so it can be captured in a CUDA graph; see ``sample.py``).

Saving and loading go through huggingface_hub's ``PyTorchModelHubMixin``, with the mixin's two hooks
bound to the run export of ``checkpoint.py`` (one format, one writer, one reader):
``model.save_pretrained(DIR)`` writes what ``train`` writes at the end of a run, ``config.json`` (the
whole run config) + ``model.safetensors``, and a model card; ``SparseTransformer.from_pretrained(DIR)``
reads any such folder, or a Hub repo holding one, without executing code.

Readings of what the paper leaves open (docs/method.md lists them all):

* init: N(0, std) with std = sqrt(0.125 / d_in) for attention and feed-forward matrices (reading
  the paper's "N(0, 0.125/sqrt(d_in))" as a variance, as OpenAI's later released code does); W_p
  and W_2 additionally scaled by 1/sqrt(2N); W_out = 0; biases 0. Embeddings take the paper's
  formula as a standard deviation: tokens 0.125/sqrt(d), each of the n_emb position tables
  0.125/sqrt(d·n_emb).
* biases in the blocks' linear layers are optional (``model.bias``); the presets have none, since
  with Adam the 2N biases writing into the residual stream stall deep models at the unigram level
  (docs/results.md).
* position 0 is predicted from a learned start embedding (the input is shifted right by one).
* LayerNorm eps 1e-5; GeLU is x·sigmoid(1.702x); no dropout on attention probabilities.
* grid position embeddings for text and audio: row = t // l, column = t mod l (l = the stride);
  image embeddings: row, column and channel of raster order with the channel fastest.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from . import patterns
from .attention import sparse_attention_qkvpacked
from .attention.common import merge_heads, split_heads
from .config import Config, ModelConfig, config_for_model
from .errors import UserError, first_line
from .kv_cache import KVCache, KVStep, LayerKVCache

# The model card save_pretrained writes as README.md beside the two files (huggingface_hub's template
# syntax; card_data is the YAML metadata: library name, tags).
MODEL_CARD = """---
{{ card_data }}
---

A byte-level Sparse Transformer (Child et al. 2019, {{ paper_url }}) saved by the sparse-transformer
package. `config.json` is the whole run config (model, data, training, sampling; the data's modality,
image shape and sample rate included) and `model.safetensors` the fp32 weights.

```python
import sparse_transformer as st
model = st.SparseTransformer.from_pretrained("THIS_FOLDER_OR_REPO")  # model.config: the run config
```

On a local copy: `sparse-transformer sample --run FOLDER`, `sparse-transformer eval --run FOLDER --data DATA`.
"""


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The paper's GeLU approximation x·sigmoid(1.702x)."""
    return x * torch.sigmoid(1.702 * x)


def cross_entropy(logits: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training and evaluation objective: nats of every byte of ``x [B, n]`` under ``logits
    [B, n, vocab]`` (``logits[:, i]`` predicts ``x[:, i]``), computed in fp32 whatever the logits'
    dtype; ``reduction`` as in ``F.cross_entropy`` (``mean`` per byte, ``sum``, ``none`` ``[B*n]``)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1).long(), reduction=reduction)


def model_pattern(cfg: ModelConfig):
    """The attention pattern of the whole model (an Interleaved pattern varies by layer)."""
    return patterns.from_name(cfg.pattern, cfg.stride, cfg.c, cfg.num_verts, cfg.part, cfg.integration)


def project(
    linear: nn.Linear,
    x: torch.Tensor,
    norm: nn.LayerNorm | None = None,
    act=None,
    residual: torch.Tensor | None = None,
    dropout: nn.Dropout | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """``residual + dropout(act(linear(norm(x))))``, each part optional: one of a block's four
    projections with the operations around it (paper Eqs. 12-14 and §5.2), the one code path of
    training, evaluation, prefill and decoding.

    Args:
        linear: the projection, ``[..., K]`` -> ``[..., N]``; x: ``[..., K]``; residual: ``[..., N]``.
        norm: a pre-LayerNorm over ``K``; act: :func:`gelu` or None; dropout: applied before the add.
        fused: one Triton launch (:func:`~sparse_transformer.decode_kernels.decode_linear`) instead of
            the torch operations, for a decoding step (a few rows; the caller passes it only where
            dropout is inactive). The two agree to the dtype's rounding. A LayerNorm without its
            affine parameters or another activation than :func:`gelu` takes the torch operations.
    Returns: ``[..., N]`` in ``x.dtype``.
    """
    if fused and act in (None, gelu) and (norm is None or (norm.weight is not None and norm.bias is not None)):
        from .decode_kernels import decode_linear

        lead, N = x.shape[:-1], linear.out_features
        y = decode_linear(
            x.reshape(-1, x.shape[-1]),
            linear.weight,
            linear.bias,
            None if norm is None else norm.weight,
            None if norm is None else norm.bias,
            1e-5 if norm is None else norm.eps,
            act is not None,
            None if residual is None else residual.reshape(-1, N),
        )
        return y.view(*lead, N)
    y = linear(x if norm is None else norm(x))
    if act is not None:
        y = act(y)
    if dropout is not None:
        y = dropout(y)
    return y if residual is None else residual + y


class Attention(nn.Module):
    """The projections and the sparse attention of one layer (paper §4): W_qkv, the heads, W_p."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.d_qk = int(cfg.d_model * cfg.qk_ratio)
        self.d_model = cfg.d_model
        self.qkv = nn.Linear(cfg.d_model, 2 * self.d_qk + cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)  # W_p
        self.pattern = model_pattern(cfg).for_layer(layer)
        self.backend = cfg.backend

    def split_heads(self, qkv: torch.Tensor):
        """The ``qkv`` projection ``[B, n, 2·d_qk + d]`` -> q, k ``[B, H, n, d_qk/H]`` and v ``[B, H, n, d/H]``."""
        return split_heads(qkv, self.n_head, self.d_qk)

    def forward(
        self,
        qkv: torch.Tensor,
        cache: LayerKVCache | None = None,
        step: KVStep | None = None,
    ) -> torch.Tensor:
        """The ``qkv`` projection ``[B, n, 2·d_qk + d]`` -> ``[B, n, d]``, the sparse attention of
        paper §4 with the heads merged (W_p is applied by the block).

        Without ``cache``: positions ``0 .. n-1`` (training, evaluation), by
        :func:`sparse_attention_qkvpacked`. With ``cache`` and no ``step``: the same, and the keys
        and values of those positions are stored in ``cache`` (prefill). With both: ``n = 1``, the
        position of ``step`` (:meth:`KVCache.step`), attending to the cached keys of earlier
        positions (decoding).
        """
        if step is not None:
            return merge_heads(cache.attend(*self.split_heads(qkv), step))
        if cache is not None:
            _, k, v = self.split_heads(qkv)
            cache.prefill(k, v)
        return sparse_attention_qkvpacked(qkv, self.n_head, self.pattern, self.d_qk, backend=self.backend)


class FeedForward(nn.Module):
    """W_1 and W_2 of the feed-forward branch, ``W_2 gelu(W_1 x)`` (paper Eq. 14); the block applies
    them with :func:`project`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.ff_mult * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)  # W_1
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)  # W_2


class Block(nn.Module):
    """Pre-LN residual block: H + a + b with b reading H + a (paper Eqs. 12-14)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.ff = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None, step: KVStep | None = None) -> torch.Tensor:
        """``x [B, n, d]`` -> ``[B, n, d]``: ``x + a``, then ``+ b``; ``cache`` and ``step`` as in
        :meth:`Attention.forward`. A decoding step on a cache made with ``fused_linear`` runs each
        projection with its norm, GeLU and residual as one kernel (:func:`project`). Activation
        checkpointing (paper §5.4) is applied from outside: ``parallel.checkpoint_blocks``."""
        fused = step is not None and step.fused_linear and not (self.training and self.dropout.p > 0)
        attn, ff = self.attn, self.ff
        qkv = project(attn.qkv, x, self.ln_1, fused=fused)
        x = project(attn.proj, attn(qkv, cache, step), residual=x, dropout=self.dropout, fused=fused)
        h = project(ff.fc, x, self.ln_2, act=gelu, fused=fused)
        return project(ff.proj, h, residual=x, dropout=self.dropout, fused=fused)


class PositionEmbedding(nn.Module):
    """Factorized learned position embeddings (paper Eq. 15): a sum of one table per axis."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.position == "image":
            h, w, c = cfg.image_shape
            self.sizes = [h, w, c]
            self.strides = [w * c, c, 1]  # raster order, channel fastest
        else:
            l = cfg.stride
            self.sizes = [math.ceil(cfg.n_ctx / l), l]
            self.strides = [l, 1]
        self.tables = nn.ParameterList(nn.Parameter(torch.empty(s, cfg.d_model)) for s in self.sizes)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embeddings of the positions ``t`` (int64, any shape): ``[*t.shape, d]``."""
        return sum(table[(t // s) % size] for table, s, size in zip(self.tables, self.strides, self.sizes))


class SparseTransformer(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="sparse-transformer",
    paper_url="https://arxiv.org/abs/1904.10509",
    tags=["sparse-transformer", "byte-level"],
    model_card_template=MODEL_CARD,
):
    """``SparseTransformer(cfg)(x)``: ``x [B, n]`` bytes (int) -> logits ``[B, n, vocab]`` where
    ``logits[:, i]`` is the model's distribution of ``x[:, i]`` given ``x[:, :i]``. An empty batch
    (``B = 0``) or sequence (``n = 0``) gives empty logits ``[B, n, vocab]``.

    ``cfg`` is the model's ``ModelConfig`` (``model.cfg``) or a run's whole ``Config``; ``model.config``
    is the whole Config either way (built by :func:`~sparse_transformer.config.config_for_model` from a
    ModelConfig alone), and it is what :meth:`save_pretrained` writes as config.json.

    Hub integration (huggingface_hub's ``PyTorchModelHubMixin``): ``save_pretrained(DIR)`` and
    ``push_to_hub(REPO)`` write the export of a run (:meth:`_save_pretrained`), ``from_pretrained``
    reads one (:meth:`from_pretrained`). The mixin's own config handling is not used: it would
    serialize ``__init__``'s arguments, and decodes neither a nested dataclass such as Config nor
    the string annotations of this module.
    """

    def __init__(self, cfg: ModelConfig | Config):
        super().__init__()
        if isinstance(cfg, Config):
            self.config, cfg = cfg, cfg.model
        else:
            self.config = config_for_model(cfg)
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)  # W_e
        self.start = nn.Parameter(torch.empty(d))  # learned start embedding (input shifted right)
        self.pos_emb = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, r) for r in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)  # W_out
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg, d = self.cfg, self.cfg.d_model
        residual_scale = 1.0 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "ln_" in name:
                p.fill_(1.0)
            elif p.dim() == 2 and name.startswith("blocks."):
                std = math.sqrt(0.125 / p.shape[1])
                if name.endswith(("attn.proj.weight", "ff.proj.weight")):
                    std *= residual_scale
                p.normal_(0.0, std)
        self.tok_emb.weight.normal_(0.0, 0.125 / math.sqrt(d))
        self.start.normal_(0.0, 0.125 / math.sqrt(d))
        for table in self.pos_emb.tables:
            table.normal_(0.0, 0.125 / math.sqrt(d * len(self.pos_emb.tables)))
        self.head.weight.zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- export and import (huggingface_hub's PyTorchModelHubMixin) ------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook under ``save_pretrained(DIR)`` and ``push_to_hub(REPO)``: the export that
        ``train`` writes at the end of a run (:func:`~sparse_transformer.checkpoint.export`), with
        ``self.config`` as config.json. The mixin then adds a model card (README.md) if the folder has none."""
        from .checkpoint import export

        export(self, self.config, save_directory)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *, map_location: str | torch.device = "cpu", **hub_kwargs
    ) -> SparseTransformer:
        """The model of an export, in eval mode on ``map_location``; ``model.config`` is its config.json.

        Args:
            pretrained_model_name_or_path: a folder holding config.json and model.safetensors, as
                written by :meth:`save_pretrained`, by ``train`` (a run directory) or by
                ``sparse-transformer export``; or the id of a Hub repo holding them (``owner/name``,
                downloaded into huggingface_hub's cache).
            map_location: the device to put the model on.
            hub_kwargs: for a Hub repo, ``revision``, ``cache_dir``, ``force_download``,
                ``local_files_only``, ``token`` (as in huggingface_hub).
        Only model.safetensors is read for weights (never a pickle), so loading runs no code; a run
        directory's checkpoint.pt is not read either (``sparse-transformer export`` writes its
        latest weights as an export).

        Raises:
            UserError: one line naming the problem: the folder does not exist or lacks a file, a file
                is truncated, corrupt or tampered with, the weights are of another architecture than
                config.json describes, or a Hub repo cannot be fetched.
        """
        from .checkpoint import read_run_config

        source = str(pretrained_model_name_or_path)
        if os.path.isdir(source):
            read_run_config(source)  # a missing or broken config.json: one line, before the mixin parses it
            return super().from_pretrained(source, map_location=map_location, **hub_kwargs)
        from huggingface_hub.errors import EntryNotFoundError
        from huggingface_hub.utils import validate_repo_id

        fix = (
            "pass a folder holding config.json and model.safetensors, or the id of a Hub repo (owner/name) holding them"
        )
        try:
            validate_repo_id(source)
        except ValueError:
            raise UserError(f"from_pretrained: {source} is not a folder; {fix}") from None
        try:
            return super().from_pretrained(source, map_location=map_location, **hub_kwargs)
        except UserError:
            raise
        except (OSError, ValueError, EntryNotFoundError) as e:
            first = first_line(e)
            raise UserError(
                f"from_pretrained: {source} is no folder here and could not be fetched from the Hub ({first}); {fix}"
            ) from None

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
    ) -> SparseTransformer:
        """The mixin's hook under ``from_pretrained``: the folder ``model_id`` (or the Hub repo's
        config.json and model.safetensors, downloaded) read by
        :func:`~sparse_transformer.checkpoint.load_export`, the reader of ``eval`` and ``sample`` too."""
        from .checkpoint import CONFIG, WEIGHTS, load_export

        folder, root = model_id, None
        if not os.path.isdir(model_id):
            from huggingface_hub import hf_hub_download

            for name in (CONFIG, WEIGHTS):  # one snapshot folder holds both
                path = hf_hub_download(
                    repo_id=model_id,
                    filename=name,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            folder = os.path.dirname(path)
            root = Path(folder).parent.parent  # the repo's cache: snapshots/<revision>/ link into its blobs/
        return load_export(folder, map_location, root)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, n]`` -> ``H_0 [B, n, d]``: position ``i`` sees token ``i-1`` (start at 0). ``B = 0``
        or ``n = 0`` gives an empty ``[B, n, d]``. Raises ValueError for ``n > n_ctx``."""
        B, n = x.shape
        if n > self.cfg.n_ctx:
            raise ValueError(f"sequence length {n} exceeds the model's n_ctx = {self.cfg.n_ctx}; use a shorter input")
        tok = self.tok_emb(x[:, :-1].long())
        h = torch.cat([self.start.expand(B, 1, -1).to(tok.dtype), tok], dim=1)[:, :n]  # n = 0: no start
        return h + self.pos_emb(torch.arange(n, device=x.device))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``x [B, n]`` bytes -> logits ``[B, n, vocab]``. With ``cache`` (prefill for sampling), the
        keys and values of positions ``0 .. n-1`` are also stored in it, so that decoding can go on
        at position ``n`` (:meth:`decode_step`); ``n`` must be at most ``cache.length``."""
        if cache is not None and (x.shape[0] != cache.batch or x.shape[1] > cache.length):
            raise ValueError(
                f"prefill of {tuple(x.shape)} does not fit a cache of batch {cache.batch}, "
                f"length {cache.length}; make the cache with new_cache(batch, length)"
            )
        h = self.embed(x)
        for r, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache.layers[r])
        return self.head(self.ln_f(h))

    # ---- incremental decoding (sampling) ------------------------------------------------------

    def new_cache(
        self,
        batch: int,
        length: int | None = None,
        device=None,
        fused: bool | None = None,
        fused_linear: bool | None = None,
    ) -> KVCache:
        """A pre-allocated sparse KV cache for ``batch`` sequences of ``length`` positions (default
        ``n_ctx``), in the model's dtype (fp16 models keep fp32 keys), on ``device`` (default the
        model's; ``"meta"`` allocates nothing, for sizing). ``fused``: decode each layer's attention
        with one Triton kernel (None: on CUDA); ``fused_linear``: each projection with its norm,
        GeLU and residual too (None: on CUDA) (see :class:`~sparse_transformer.kv_cache.KVCache`).
        Raises ValueError outside ``1..n_ctx``."""
        cfg = self.cfg
        length = cfg.n_ctx if length is None else length
        if not 0 < length <= cfg.n_ctx:
            raise ValueError(f"cache length {length} must be in 1..n_ctx = {cfg.n_ctx}")
        dk, dv = self.blocks[0].attn.d_qk // cfg.n_head, cfg.d_model // cfg.n_head
        w = self.head.weight
        device = w.device if device is None else device
        patterns = [b.attn.pattern for b in self.blocks]
        return KVCache(patterns, cfg.n_head, batch, length, dk, dv, device, w.dtype, fused, fused_linear)

    def decode_step(self, token: torch.Tensor | None, pos: torch.Tensor | int, cache: KVCache) -> torch.Tensor:
        """Logits of position ``pos`` given the cached positions ``0 .. pos-1`` (one sampling step).

        Args:
            token: ``[B]`` the byte at position ``pos - 1`` (the input is shifted right); ignored at
                ``pos = 0``, where the learned start embedding is fed (None is allowed there).
            pos: ``[1]`` int64 on the model's device (no host sync; not range-checked), or an int
                (checked: ValueError outside ``0 .. cache.length - 1``). Positions are decoded in
                order on one cache, after the prefill (:meth:`forward` with ``cache``) if any.
            cache: from :meth:`new_cache`.
        Returns:
            ``[B, vocab]``, equal to ``self(x)[:, pos]`` for any ``x`` that holds the fed bytes.
        """
        device = self.start.device
        if not isinstance(pos, torch.Tensor):
            if not 0 <= pos < cache.length:
                raise ValueError(f"position {pos} is outside the cache (length {cache.length}); make a longer cache")
            pos = torch.tensor([pos], device=device)
        if token is None:
            token = torch.zeros(cache.batch, dtype=torch.long, device=device)
        tok = self.tok_emb(token.view(cache.batch, 1).long())
        h = torch.where(pos == 0, self.start.to(tok.dtype), tok) + self.pos_emb(pos)
        step = cache.step(pos)
        for block, layer_cache in zip(self.blocks, cache.layers):
            h = block(h, layer_cache, step)
        return project(self.head, h, self.ln_f, fused=step.fused_linear)[:, 0]

    def loss(self, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy in nats of every byte of ``x [B, n]`` (``reduction`` as in F.cross_entropy)."""
        return cross_entropy(self(x), x, reduction)
