"""Hand-crafted prompt templates per dataset, as the CoOp code base's `CUSTOM_TEMPLATES` (trainers/coop.py).

Used for zero-shot CLIP, for the identity test ("a photo of a {c}.") and for KgCoOp's regulariser t_c^hand.
Keys are this package's registry names.
"""
from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."

TEMPLATES: dict[str, str] = {
    "imagenet": DEFAULT_TEMPLATE,
    "caltech101": DEFAULT_TEMPLATE,
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": DEFAULT_TEMPLATE,
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": DEFAULT_TEMPLATE,
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenetv2": DEFAULT_TEMPLATE,
    "imagenet_sketch": DEFAULT_TEMPLATE,
    "imagenet_a": DEFAULT_TEMPLATE,
    "imagenet_r": DEFAULT_TEMPLATE,
    "imagefolder": DEFAULT_TEMPLATE,
}


def template_for(name: str) -> str:
    """The template of a registry name; DEFAULT_TEMPLATE for a name not in the table."""
    return TEMPLATES.get(name, DEFAULT_TEMPLATE)
