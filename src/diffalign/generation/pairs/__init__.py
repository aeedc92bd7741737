"""Self-generated preference datasets: `run_pairs` behind `diffalign pairs` (run.py), its settings
(`PairsConfig`, config.py), the recipes (recipes.py), a unit's images and the pair rules (units.py), the
filter (filter.py), further tries (tries.py) and the output folder (store.py)."""

from .config import PairsConfig
from .run import make_pairs, run_pairs
from .store import PairsResult, read_pairs

__all__ = ["PairsConfig", "PairsResult", "make_pairs", "read_pairs", "run_pairs"]
