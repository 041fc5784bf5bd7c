"""Hand-crafted prompt templates per dataset, as the CoOp code base's `CUSTOM_TEMPLATES` (trainers/coop.py).

Used for zero-shot CLIP, for the identity test ("a photo of a {c}.") and for KgCoOp's regulariser t_c^hand.
Keys are this package's registry names.

`ENSEMBLE_TEMPLATES`: the 60 prompts whose averaged frozen text features are PromptSRC's text targets
(`intcoop.train.selfreg`).
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


# 60 of the ImageNet prompts of OpenAI's CLIP prompt-engineering notebook (openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), in the order PromptSRC uses them (muzairkhattak/PromptSRC,
# trainers/imagenet_templates.py, IMAGENET_TEMPLATES, which names the notebook as its source).
ENSEMBLE_TEMPLATES: list[str] = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.",
]
