"""condense: dataset distillation you can read like the papers.

import condense
ds = condense.load_distilled("data/store/runs/<run_id>")   # (image, hard label, soft label)
"""

from condense.config import PipelineConfig, load_config, preset_names
from condense.export import DistilledDataset, load_distilled
from condense.methods import METHODS, get_method

__all__ = [
    "METHODS",
    "DistilledDataset",
    "PipelineConfig",
    "get_method",
    "load_config",
    "load_distilled",
    "preset_names",
]
