"""intcoop: fast, exact, interpretable instance-conditional prompt tuning of CLIP (IntCoOp, EMNLP 2024).

Public names: `IntCoOp` (the model), `encode_prompts` (the batched per-instance text encoder), `fast_logits`
(logits of images x class names), `load_clip`. Heavier parts (training, evaluation, explanation, labelling) are
imported from their rooms: `intcoop.train`, `intcoop.evaluation`, `intcoop.attributes`, `intcoop.experiments`.
"""
from .api import fast_logits
from .inference import default_model
from .clip import WeightsUnavailable, load_clip
from .config import ModelConfig, RunConfig, load_config
from .model import IntCoOp
from .text import encode_prompts

__version__ = "0.1.0"
__all__ = ["IntCoOp", "encode_prompts", "fast_logits", "default_model", "load_clip", "WeightsUnavailable",
           "ModelConfig", "RunConfig", "load_config"]
