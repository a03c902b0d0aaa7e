"""Synthetic whole-slide images for the quick start, the tests and the benchmarks."""

from sample_slides.generate import (
    tissue_tile,
    write_generic_tiff,
    write_samples,
    write_svs_like,
)

__all__ = ["tissue_tile", "write_generic_tiff", "write_samples", "write_svs_like"]
