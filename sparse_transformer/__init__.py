"""sparse-transformer: the Sparse Transformer (Child, Gray, Radford, Sutskever 2019) in PyTorch.

import sparse_transformer as st
pattern = st.patterns.fixed(stride=128, c=32)
out = st.sparse_attention(q, k, v, pattern)          # q, k, v [batch, heads, n, head_dim]
cfg = st.load_config("configs/enwik8.toml")
model = st.SparseTransformer(cfg.model)
"""

from . import patterns
from .attention import sparse_attention
from .config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig, load_config
from .errors import UserError
from .model import SparseTransformer

__version__ = "0.1.0"

__all__ = [
    "patterns",
    "sparse_attention",
    "load_config",
    "Config",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "SampleConfig",
    "SparseTransformer",
    "UserError",
    "__version__",
]
