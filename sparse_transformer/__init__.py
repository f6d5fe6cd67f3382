"""sparse-transformer: the Sparse Transformer (Child, Gray, Radford, Sutskever 2019) in PyTorch.

    import sparse_transformer as st
    pattern = st.patterns.fixed(stride=128, c=32)
    out = st.sparse_attention(q, k, v, pattern)          # q, k, v [batch, heads, n, head_dim]
    out = st.sparse_attention_qkvpacked(qkv, 8, pattern) # qkv [batch, n, 3 * 8 * head_dim]
    cfg = st.load_config("enwik8")                       # a preset by name, or a TOML file
    model = st.SparseTransformer(cfg.model)

The names below are imported on first use, so that ``import sparse_transformer`` (and the command
line's ``--help``) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_EXPORTS = {
    "patterns": (".patterns", None),
    "sparse_attention": (".attention", "sparse_attention"),
    "sparse_attention_qkvpacked": (".attention", "sparse_attention_qkvpacked"),
    "load_config": (".config", "load_config"),
    "Config": (".config", "Config"),
    "ModelConfig": (".config", "ModelConfig"),
    "DataConfig": (".config", "DataConfig"),
    "TrainConfig": (".config", "TrainConfig"),
    "SampleConfig": (".config", "SampleConfig"),
    "SparseTransformer": (".model", "SparseTransformer"),
    "UserError": (".errors", "UserError"),
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = _EXPORTS[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
