"""One source of truth: every backend's index sets come from the pattern object.

Each backend is run on inputs that make its visited (query, key) pairs readable: q = 0 (every score
equal, so each allowed key gets weight 1/|keys|), k = identity (dQ[i, j] is then the score gradient of
pair (i, j)) and one-hot columns in v and dO. So the output, dV and dQ say which keys each query read
in the forward pass, the dK/dV walk and the dQ walk. Those sets must equal ``pattern.mask`` for the
paper's patterns and for a pattern none of the backends has seen (:class:`NewRules`, defined only by
its terms): a rule written once in ``patterns.py`` reaches the factorized backend, FlexAttention,
the Triton plan and kernels, and the KV cache (docs/design.md §4).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass

from sparse_transformer import patterns as P
from sparse_transformer.attention.factorized import factorized_attention
from sparse_transformer.attention.flex import flex_attention_sparse
from sparse_transformer.kv_cache import KVCache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
L = 8


@dataclass(frozen=True)
class NewRules(P.Pattern):
    """A pattern written only as terms (disjoint by construction), other terms per head: even heads
    read a 3-key band and every l-th key at least 2l back, odd heads a 2-key band and the first cell
    of every earlier block."""

    l: int = L

    def terms(self, head: int = 0):
        if head % 2:
            return (P.Band(2), P.Summary(self.l, 0, 1, earlier_blocks_only=True))
        return (P.Band(3), P.Stride(self.l, 2 * self.l))

    def describe(self) -> str:
        return f"new_rules(l={self.l})"


PATTERNS = [
    P.strided(L),
    P.strided(L, "stride"),
    P.fixed(L, 2, num_verts=2),
    P.fixed(L, 2, num_verts=2, part="summary"),
    P.multihead(P.strided(L)),
    P.multihead(P.fixed(L, 2, num_verts=2)),
    P.local(5),
    P.dense(),
    NewRules(),
]
N, H = 37, 2  # not a multiple of L; two heads so per-head summary offsets differ


def _probe(n, heads, device="cpu", dtype=torch.float32):
    """q = 0, k = I, v = [I | noise], dO = [I | noise]: see the module docstring."""
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(n).expand(1, heads, n, n)
    noise = lambda: torch.randn(1, heads, n, 8, generator=g)
    q = torch.zeros(1, heads, n, n)
    v = torch.cat([eye, noise()], dim=-1)
    do = torch.cat([eye, noise()], dim=-1)
    return [t.to(device, dtype).requires_grad_(i < 3) for i, t in enumerate((q, eye.clone(), v, do))]


def _visited(attend, n, heads, backward=True, device="cpu"):
    """``{"out": [H, n, n], "dv": ..., "dq": ...}`` bool: entry (h, i, j) says query i of head h read
    key j in the forward pass (out), in the dK/dV walk (dv) and in the dQ walk (dq)."""
    q, k, v, do = _probe(n, heads, device)
    out = attend(q, k, v) if backward else attend(q.detach(), k.detach(), v.detach())
    sets = {"out": out[0, :, :, :n] != 0}
    if backward:
        dq, dv = torch.autograd.grad(out, (q, v), do)
        sets["dv"] = (dv[0, :, :, :n] != 0).transpose(-1, -2)  # dV[j, i] = p_ij
        sets["dq"] = dq[0].abs() > 1e-5  # dQ[i, j] = scale·dS_ij (k = I), 0 (to rounding) in a one-key row
    return {name: s.cpu() for name, s in sets.items()}


def _masks(pattern, n, heads):
    return torch.stack([pattern.mask(n, h) for h in range(heads)])


def _assert_sets(sets, pattern, n, heads):
    mask = _masks(pattern, n, heads)
    for name, got in sets.items():
        # a row with one key has probability 1 whatever its score, so its score gradient is 0
        want = mask & (mask.sum(-1, keepdim=True) > 1) if name == "dq" else mask
        assert torch.equal(got, want), f"{pattern.describe()}: {name} visits {(got != want).sum().item()} pairs wrongly"


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_factorized_reads_the_pattern(pattern):
    _assert_sets(_visited(lambda q, k, v: factorized_attention(q, k, v, pattern), N, H), pattern, N, H)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_flex_block_masks_read_the_pattern(pattern):
    """Forward only on CPU (Flex has no CPU backward); the GPU test below adds the gradients."""
    sets = _visited(lambda q, k, v: flex_attention_sparse(q, k, v, pattern), N, H, backward=False)
    _assert_sets(sets, pattern, N, H)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_kv_cache_reads_the_pattern(pattern):
    q, k, v, _ = (t.detach() for t in _probe(N, H))
    cache = KVCache([pattern], H, 1, N, q.shape[-1], v.shape[-1])
    layer = cache.layers[0]
    out = torch.cat(
        [
            layer.attend(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache.step(torch.tensor([i])))
            for i in range(N)
        ],
        dim=2,
    )
    _assert_sets({"out": out[0, :, :, :N] != 0}, pattern, N, H)


def _triton():
    pytest.importorskip("triton")
    from sparse_transformer.attention.triton import ops, triton_attention

    if not (torch.cuda.is_available() or ops.INTERPRET):
        pytest.skip("the Triton kernels were imported compiled without a GPU")
    return triton_attention


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_triton_plan_and_kernels_read_the_pattern(pattern):
    """Under the CPU interpreter (32 x 32 tiles: several tiles, runs and summary blocks at n = 37)."""
    triton_attention = _triton()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _assert_sets(_visited(lambda q, k, v: triton_attention(q, k, v, pattern), N, H, device=device), pattern, N, H)


@pytest.mark.parametrize("owned_band", [True, False], ids=["owned-band", "two-pass-band"])
@pytest.mark.parametrize("pattern", [P.strided(L), P.local(5), NewRules()], ids=lambda p: p.describe())
def test_triton_band_backward_both_ways_reads_the_pattern(pattern, owned_band):
    """The Band term's backward forced owned (dK, dV and dQ from the chunked key-tile walk) and
    forced two-pass (a dQ pass and a dK/dV launch)."""
    triton_attention = _triton()
    from sparse_transformer.attention.triton import Tuning

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = lambda q, k, v: triton_attention(q, k, v, pattern, tuning=Tuning(owned_band=owned_band))
    _assert_sets(_visited(fn, N, H, device=device), pattern, N, H)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
def test_gpu_flex_reads_the_pattern(pattern):
    sets = _visited(lambda q, k, v: flex_attention_sparse(q, k, v, pattern), N, H, device="cuda")
    _assert_sets(sets, pattern, N, H)


def test_term_rules_agree_with_their_key_sets():
    """The rules backends use (runs, gaps, compact positions and counts) against the terms' masks."""
    n = 50
    i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    for t in (P.Stride(L, 0), P.Stride(L, L), P.Stride(L, 2 * L), P.Stride(5, 7)):
        R = t.run_length(n)
        assert R == -(-n // t.size) and t.gap == -(-t.min_distance // t.size)
        rows = torch.arange(R)
        pos = rows.view(R, 1) * t.size + torch.arange(t.size).view(1, t.size)  # [row, run] -> position
        # the term on residue runs, mapped back to positions, is the term's key set
        for r in range(min(t.size, n)):
            p = pos[:, r][pos[:, r] < n]
            ok = t.run_allows(torch.arange(len(p)).view(-1, 1), torch.arange(len(p)).view(1, -1))
            assert torch.equal(ok & (p.view(-1, 1) >= p.view(1, -1)), t.allows(p.view(-1, 1), p.view(1, -1)))
    for t in (P.Summary(L, 6, 8), P.Summary(L, 4, 6, True), P.Summary(5, 0, 1, True), P.Summary(5, 2, 5)):
        s = torch.arange(t.compact_length(n))
        positions = t.position(s)
        assert positions.tolist() == [p for p in range(-(-n // t.size) * t.size) if t.lo <= p % t.size < t.hi]
        assert [t.slot(int(p)) for p in positions] == s.tolist() and t.slot(t.lo - 1 if t.lo else t.hi) is None
        real = positions < n
        assert t.count_below(n) == int(real.sum())
        read = t.allows_compact(i, s.view(1, -1)) & real.view(1, -1)
        assert torch.equal(read.sum(1), torch.as_tensor(t.keys_per_query(torch.arange(n).numpy())))
        full = torch.zeros(n, n, dtype=torch.bool)
        full[:, positions[real]] = read[:, real]
        assert torch.equal(full, t.allows(i, j))


def test_a_custom_pattern_is_a_pattern():
    """Counts, masks and layouts of a pattern defined only by terms follow from them too."""
    p = NewRules()
    i, j = torch.arange(40).view(40, 1), torch.arange(40).view(1, 40)
    for h in range(2):
        m = p.mask(40, h)
        assert p.num_pairs(40, h) == m.sum().item() and p.max_keys(40, h) == m.sum(1).max().item()
        assert torch.equal(p.block_layout(40, 8, h), m.view(5, 8, 5, 8).any(3).any(1))
        assert sum(t.allows(i, j).sum() for t in p.terms(h)) == m.sum()  # disjoint terms
    assert [hs for _, hs in p.head_groups(4)] == [[0, 2], [1, 3]]
