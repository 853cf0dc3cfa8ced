"""critbatch: measure the critical batch size and the gradient noise scale (McCandlish et al. 2018).

A plain library (no Hydra inside): tasks, one-run training, the B_simple estimator, run records,
the steps/examples tradeoff fit and its plots.
"""

__all__ = ["NoiseScale"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the analysis reads records and fits curves without loading torch.
    if name == "NoiseScale":
        from critbatch.gns import NoiseScale
        return NoiseScale
    raise AttributeError(f"module 'critbatch' has no attribute {name!r}")
