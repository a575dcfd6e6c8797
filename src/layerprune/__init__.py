"""layerprune: make language models shallower, one measured layer at a time.

The public API: `prune(PruneConfig)` runs the whole job; `score(ScoreConfig)`
ranks the layers of a model once; `evaluate(EvalConfig)` scores a model
against its original; `compare(CompareConfig)` runs the method against the
baselines; `export_gguf(run_dir)` writes a finished run's model as GGUF. The CLI
(`layerprune ...`) is a thin layer over these.
"""

from .api import evaluate, export_gguf, score
from .compare import compare
from .config import CompareConfig, DataConfig, EvalConfig, ExportConfig, HealConfig, PruneConfig, ScoreConfig
from .errors import LayerpruneError
from .importance import METRICS
from .pipeline import prune
from .surgery import find_layers, original_indices, remove_layers
from .tasks import TASKS

__all__ = ["CompareConfig", "DataConfig", "EvalConfig", "ExportConfig", "HealConfig", "PruneConfig", "ScoreConfig",
           "LayerpruneError", "METRICS", "TASKS", "prune", "score", "evaluate", "compare", "export_gguf", "find_layers",
           "original_indices", "remove_layers"]
__version__ = "0.1.0"
