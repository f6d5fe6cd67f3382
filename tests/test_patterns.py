"""Patterns: the paper's pictures, counts at paper size, closed forms vs masks, the transpose trick,
per-head offsets, validity (two-layer reachability) and bad parameters."""

import numpy as np
import pytest
import torch

from sparse_transformer import patterns as P

# docs/method.md §2-3 (paper §4.3, Fig. 3), n = 12, l = 4, c = 1 (strided local part: the released code's l keys)
PICTURES = {
    "strided-local": (
        P.strided(4, "local"),
        """
x...........
xx..........
xxx.........
xxxx........
.xxxx.......
..xxxx......
...xxxx.....
....xxxx....
.....xxxx...
......xxxx..
.......xxxx.
........xxxx""",
    ),
    "strided-stride": (
        P.strided(4, "stride"),
        """
x...........
.x..........
..x.........
...x........
x...x.......
.x...x......
..x...x.....
...x...x....
x...x...x...
.x...x...x..
..x...x...x.
...x...x...x""",
    ),
    "fixed-block": (
        P.fixed(4, 1, part="block"),
        """
x...........
xx..........
xxx.........
xxxx........
....x.......
....xx......
....xxx.....
....xxxx....
........x...
........xx..
........xxx.
........xxxx""",
    ),
    "fixed-summary": (
        P.fixed(4, 1, part="summary"),
        """
............
............
............
...x........
...x........
...x........
...x........
...x...x....
...x...x....
...x...x....
...x...x....
...x...x...x""",
    ),
}


@pytest.mark.parametrize("name", list(PICTURES))
def test_paper_pictures(name):
    pattern, picture = PICTURES[name]
    rows = picture.strip().splitlines()
    want = torch.tensor([[ch == "x" for ch in row] for row in rows])
    assert torch.equal(pattern.mask(12), want)
    assert [line.split()[-1] for line in pattern.ascii(12).splitlines()] == rows


def test_both_is_the_union_of_the_parts():
    for p in (P.strided(4), P.fixed(4, 1)):
        first, second = p.parts
        assert torch.equal(p.mask(12), p.with_part(first).mask(12) | p.with_part(second).mask(12))


def test_paper_size_counts():
    n = 12288
    causal = n * (n + 1) // 2
    s, f = P.strided(128), P.fixed(128, 32)
    assert s.num_pairs(n) == 2_148_416 and s.max_keys(n) == 223
    assert f.num_pairs(n) == 19_470_336 and f.max_keys(n) == 3_168
    assert round(100 * s.num_pairs(n) / causal, 3) == 2.845
    assert round(100 * f.num_pairs(n) / causal, 3) == 25.787


ALL = [
    P.dense(),
    P.local(5),
    P.strided(4),
    P.strided(5, "stride"),
    P.strided(3, "local"),
    P.fixed(6, 2, num_verts=3),
    P.fixed(6, 2, 3, "summary"),
    P.fixed(5, 1, 1, "block"),
    P.multihead(P.fixed(8, 2, 2)),
    P.multihead(P.strided(4)),
]


@pytest.mark.parametrize("pattern", ALL, ids=lambda p: p.describe())
def test_closed_forms_match_the_mask(pattern):
    for n in (1, 7, 12, 33, 50):
        for h in range(4):
            m = pattern.mask(n, h)
            assert (m & ~torch.ones(n, n, dtype=torch.bool).tril()).sum() == 0  # causal
            keys = pattern.keys_per_query(n, h)
            assert np.array_equal(keys, m.sum(1).numpy())
            assert pattern.num_pairs(n, h) == m.sum().item()
            i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
            assert sum(t.allows(i, j).sum().item() for t in pattern.terms(h)) == m.sum().item()  # disjoint terms
            for b in (1, 2, 3, 4, 8, 16):
                nb = -(-n // b)
                padded = torch.zeros(nb * b, nb * b, dtype=torch.bool)
                padded[:n, :n] = m
                assert torch.equal(padded.view(nb, b, nb, b).any(3).any(1), pattern.block_layout(n, b, h))


def test_block_layout_at_paper_size_without_n_squared():
    # strided A2 in natural order touches every 128x128 tile (docs/method.md §2)
    n = 12288
    lay = P.strided(128, "stride").block_layout(n, 128)
    assert lay.sum().item() == 4656 == (96 * 97) // 2
    assert P.strided(128, "stride").block_layout(n, 32).sum().item() == 18624


def test_strided_through_the_transpose_equals_natural_order():
    """Permute p = r·l + c -> c·(n/l) + r; block-diagonal causal attention on runs of n/l is A2."""
    n, l = 48, 6
    R = n // l
    perm = torch.tensor([(p % l) * R + p // l for p in range(n)])  # natural -> transposed position
    run = torch.arange(n) // R
    t = torch.arange(n)
    transposed = (run.view(n, 1) == run.view(1, n)) & (t.view(n, 1) >= t.view(1, n))
    natural = transposed[perm][:, perm]
    assert torch.equal(natural, P.strided(l, "stride").mask(n))


def test_fixed_per_head_summary_offsets():
    n, l, c = 32, 8, 2
    p = P.fixed(l, c, num_verts=3, part="summary")
    for h in range(6):
        v = h % 3
        cols = p.mask(n, h).any(0).nonzero().flatten()
        assert set((cols % l).tolist()) == set(range(l - (v + 1) * c, l - v * c))
    with pytest.raises(ValueError, match="num_verts"):
        P.fixed(8, 3, num_verts=3)


def _reach_two_layers(first, second, n, head=0):
    """Which (i, j) connect through layer `first` then `second`, with the residual identity path."""
    eye = torch.eye(n, dtype=torch.int64)
    a = first.mask(n, head).long() + eye
    b = second.mask(n, head).long() + eye
    return (b @ a) > 0


@pytest.mark.parametrize("n,l,c", [(48, 6, 2), (64, 8, 1)])
def test_validity_two_layer_reachability(n, l, c):
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for p in (P.merged(P.strided(l)), P.merged(P.fixed(l, c))):
        assert torch.equal(_reach_two_layers(p, p, n), causal)
    lay = P.interleaved(P.fixed(l, c))
    assert torch.equal(_reach_two_layers(lay.for_layer(0), lay.for_layer(1), n), causal)  # block then summary
    assert not torch.equal(_reach_two_layers(lay.for_layer(1), lay.for_layer(0), n), causal)  # the invalid order
    s = P.interleaved(P.strided(l))
    assert torch.equal(_reach_two_layers(s.for_layer(0), s.for_layer(1), n), causal)
    assert torch.equal(_reach_two_layers(s.for_layer(1), s.for_layer(0), n), causal)


def test_integrations():
    f = P.fixed(8, 2, num_verts=2)
    assert P.merged(f.with_part("block")).part == "both"
    inter = P.interleaved(f)
    assert [inter.for_layer(r).part for r in range(4)] == ["block", "summary", "block", "summary"]
    mh = P.multihead(f)
    assert mh.terms(0) == f.with_part("block").terms(0)
    assert mh.terms(1) == f.with_part("summary").terms(0) and mh.terms(3) == f.with_part("summary").terms(1)
    assert [h for _, hs in mh.head_groups(4) for h in hs] == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="for_layer"):
        inter.mask(8)
    with pytest.raises(ValueError, match="strided or fixed"):
        P.multihead(P.dense())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: P.strided(0), "stride=0 must be a positive integer"),
        (lambda: P.strided(-3), "stride=-3"),
        (lambda: P.local(0), "window=0"),
        (lambda: P.fixed(8, 9), "c=9 is larger than stride=8"),
        (lambda: P.fixed(8, 0), "c=0"),
        (lambda: P.fixed(8, 3, num_verts=3), "num_verts\\*c = 3\\*3 = 9 exceeds stride=8"),
        (lambda: P.strided(8, part="summary"), "part='summary' is not one of"),
        (lambda: P.from_name("sparse", 8), "unknown pattern 'sparse'"),
        (lambda: P.from_name("fixed", 8, 2, integration="mixed"), "unknown integration"),
        (lambda: P.from_name("fixed", 8, 2, part="summary", integration="interleaved"), "use part='both'"),
        (lambda: P.from_name("strided", 8, part="local", integration="multihead"), "use part='both'"),
        (lambda: P.from_name("dense", integration="multihead"), "needs a strided or fixed pattern"),
        (lambda: P.from_name("local", 8, part="stride"), "it has no parts"),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_from_name_builds_what_it_is_told():
    assert P.from_name("fixed", 8, 2, 2, "summary") == P.fixed(8, 2, 2, "summary")  # merged: the part itself
    assert P.from_name("strided", 8, integration="interleaved") == P.interleaved(P.strided(8))
    assert P.from_name("fixed", 8, 2, 2, integration="multihead") == P.multihead(P.fixed(8, 2, 2))
    assert P.from_name("local", 5) == P.local(5) and P.from_name("dense", 32) == P.dense()
    assert isinstance(P.from_name("strided", 8, integration="interleaved"), P.Pattern)


def test_picture(tmp_path):
    img = P.fixed(128, 32).picture(12288)
    assert img.size[0] <= 1024
    small = P.strided(4).picture(12)
    assert small.getpixel((0, 0)) == 255 and small.getpixel((small.width - 1, 0)) == 0
