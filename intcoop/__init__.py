"""intcoop: fast, exact, interpretable instance-conditional prompt tuning of CLIP (IntCoOp, EMNLP 2024).

Public names: `IntCoOp` (the model), `encode_prompts` (the batched per-instance text encoder), `fast_logits`
(logits of images x class names), `load_clip`. Heavier parts (training, evaluation, explanation, labelling) are
imported from their modules: `intcoop.train`, `intcoop.evaluate`, `intcoop.explain`, `intcoop.labels`.
"""
from .api import default_model, fast_logits
from .backbone import WeightsUnavailable, load_clip
from .config import ModelConfig, RunConfig, load_config
from .model import IntCoOp
from .text import encode_prompts

__version__ = "0.1.0"
__all__ = ["IntCoOp", "encode_prompts", "fast_logits", "default_model", "load_clip", "WeightsUnavailable",
           "ModelConfig", "RunConfig", "load_config"]
