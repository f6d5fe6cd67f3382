"""Benchmarks behind ``sparse-transformer bench attention|train|sample|tiles``.

* :func:`sparse_transformer.bench.attention.bench_attention`: attention backends x patterns x
  lengths, forward and forward+backward, beside dense SDPA and the composed-Flex baseline.
* :func:`sparse_transformer.bench.train.bench_train`: tokens/s and peak memory of a full training
  step, sparse model vs the same model with dense SDPA attention.
* :mod:`sparse_transformer.bench.sample`: KV-cached vs uncached sampling speed.
* :func:`sparse_transformer.bench.tiles.bench_tiles`: a tile sweep of the Triton kernels per launch
  role (CUDA), whose winners a developer copies into ``attention/triton/tiles.py``;
  with ``--profile`` (``profile=True``) instead every launch of the
  committed tiles against the card's matmul and copy ceilings measured in the same call;
  :func:`~sparse_transformer.bench.tiles.sass_report` (``--sass``, no GPU) every launch compiled for
  sm_90: registers, spills, wgmma instructions and waits.

Every benchmark writes JSON lines (one object per measured case) and prints a markdown table.
Baselines run in the same process and the same invocation as what they are compared with.
"""
