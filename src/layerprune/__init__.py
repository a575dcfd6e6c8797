"""layerprune: make language models shallower, one measured layer at a time.

The public API: `prune(PruneConfig)` runs the whole job; `score()` ranks the
layers of a model once; the config dataclasses describe a run. The CLI
(`layerprune ...`) is a thin layer over these.
"""

from .config import DataConfig, HealConfig, PruneConfig
from .errors import LayerpruneError
from .importance import METRICS
from .api import evaluate, score
from .pipeline import prune
from .surgery import find_layers, original_indices, remove_layers
from .tasks import TASKS

__all__ = ["DataConfig", "HealConfig", "PruneConfig", "LayerpruneError", "METRICS", "TASKS", "prune", "score", "evaluate",
           "find_layers", "original_indices", "remove_layers"]
__version__ = "0.1.0"
