"""critbatch: measure the critical batch size and the gradient noise scale (McCandlish et al. 2018).

A plain library (no Hydra inside): tasks, one-run training, the B_simple estimator, run records,
the steps/examples tradeoff fit and its plots.
"""
from critbatch.gns import NoiseScale

__all__ = ["NoiseScale"]
__version__ = "0.1.0"
