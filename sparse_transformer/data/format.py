"""The prepared-data format both sides agree on: split names, meta.json keys and the format version.

:mod:`.prepare` writes it and :mod:`.loader` reads it; both import this module, so neither imports
the other for these constants (docs/design.md §2).
"""

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
META_KEYS = ("kind", "modality", "record_len", "shape", "sample_rate", "splits", "source", "format_version")
