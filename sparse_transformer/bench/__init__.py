"""Benchmarks behind ``sparse-transformer bench attention|train|sample``.

* :func:`sparse_transformer.bench.attention.bench_attention`: attention backends x patterns x
  lengths, forward and forward+backward, beside dense SDPA and the composed-Flex baseline.
* :func:`sparse_transformer.bench.train.bench_train`: tokens/s and peak memory of a full training
  step, sparse model vs the same model with dense SDPA attention.
* :mod:`sparse_transformer.bench.sample`: KV-cached vs uncached sampling speed.

Every benchmark writes JSON lines (one object per measured case) and prints a markdown table.
Baselines run in the same process and the same invocation as what they are compared with.
"""
