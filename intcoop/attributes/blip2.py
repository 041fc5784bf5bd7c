"""Attribute labels from BLIP-2: answer parsing, the model, and batched, resumable labelling into a labels file.

Owns (METHOD.md, "Attribute labels (BLIP-2)"):
  parse_answer(answer, classname) -> one lower-case word or None
  (the labels file itself, its format, reading and writing: `labels_file.py`)
  label_images(items, out_path, ...) -> LabelStats     (BLIP-2 via Blip2Labeler, or any callable)
  Blip2Labeler, load_blip2, ModelUnavailableError
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .labels_file import append_records, scan_labels, write_labels

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
DEFAULT_QUESTION = "Question: Which one adjective best describes the {} in this image? Answer:"

# Words that never make an attribute: articles, pronouns, auxiliaries, prepositions, conjunctions, words of the
# question itself (echoed by BLIP-2 OPT), hedges and contraction tails.
STOP_WORDS = frozenset("""
a an the this that these those there here it its it's they them their he him his she her i me my we our you your
is are was were be been being am do does did has have had can could would should will may might must shall
of in on at to for with from by as about into onto over under near behind above below between through up down
out off around against along across inside outside
and or but nor so yet if than then because while
what which who whom whose where when why how
photo photograph photos image images picture pictures pic shot camera scene background foreground
answer question adjective adjectives describe describes described description best one word words
very really quite most more much some any all both each every many few just also too only so such own same
yes no not none nothing unknown unclear unsure sure maybe perhaps probably
like looks look looking seems seem appears appear kind type sort thing things object objects
s t d ll re ve m
""".split())

_SPLIT = re.compile(r"[\W_]+")


class ModelUnavailableError(RuntimeError):
    """The BLIP-2 weights cannot be loaded (offline, unknown id, incomplete folder); says how to provide them."""


# ----------------------------------------------------------------------------------------------- parsing
def _words(text: str) -> list[str]:
    return [w for w in _SPLIT.split(text.lower()) if w]


def parse_answer(answer: str | None, classname: str) -> str | None:
    """One lower-case attribute word from a raw BLIP-2 answer, or None when there is no usable word.

    Strips an echoed prompt (text up to the last "Answer:", or a leading "Question: ...?"), punctuation,
    the words of `classname` (and their plural -s / -es forms), STOP_WORDS and non-alphabetic tokens; returns
    the first remaining word.
    """
    if not answer:
        return None
    text = answer
    cut = text.lower().rfind("answer:")
    if cut >= 0:
        text = text[cut + len("answer:"):]
    elif text.lstrip().lower().startswith("question:"):
        q = text.find("?")
        text = text[q + 1:] if q >= 0 else ""
    cls = set(_words(classname))
    for w in _words(text):
        if w in STOP_WORDS or w in cls or not w.isalpha():
            continue
        if (w.endswith("s") and w[:-1] in cls) or (w.endswith("es") and w[:-2] in cls):
            continue
        return w
    return None


# -------------------------------------------------------------------------------------------- BLIP-2
def _is_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(model))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _how_to(model: str, unreachable: str | None = None) -> str:
    """The error text for a hub id that is not in the cache (offline, or `unreachable`: the hub endpoint's URL)."""
    why = (f"not in the Hugging Face cache, and {unreachable} cannot be reached (no connection within a few seconds)"
           if unreachable else "not available offline (not a local folder, not in the Hugging Face cache)")
    return (f"BLIP-2 model '{model}' is {why}. "
            f"Provide it once: on a machine with network access run `huggingface-cli download {model}` "
            f"(or `hf download {model} --local-dir DIR`) and copy the cache / DIR here, then pass the local "
            f"folder as the model; or " + ("restore the network connection." if unreachable else
                                            "unset HF_HUB_OFFLINE to let transformers download it."))


def load_blip2(model: str = DEFAULT_MODEL, *, device="cpu", dtype=None):
    """(Blip2Processor, Blip2ForConditionalGeneration in eval mode on `device`) from a hub id or a local folder.

    Raises ModelUnavailableError naming the model and how to provide it when the weights cannot be found.
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    def load(src, **kw):
        proc = Blip2Processor.from_pretrained(src, **kw)
        net = Blip2ForConditionalGeneration.from_pretrained(src, dtype=dtype, **kw)
        return proc, net

    if _is_local(model):
        src = os.path.expanduser(model)
        if not os.path.isdir(src):
            raise ModelUnavailableError(f"BLIP-2 model folder '{model}' does not exist.")
        try:
            proc, net = load(src)
        except (OSError, ValueError) as e:
            raise ModelUnavailableError(f"BLIP-2 model folder '{model}' could not be loaded ({e}); it needs "
                                        f"the processor files and weights saved by save_pretrained.") from e
    else:
        try:
            proc, net = load(model, local_files_only=True)
        except OSError as first:
            if _offline():
                raise ModelUnavailableError(_how_to(model)) from first
            from huggingface_hub import constants

            from ..clip import hub_reachable
            if not hub_reachable(constants.ENDPOINT):        # fail in seconds, not after minutes of retries
                raise ModelUnavailableError(_how_to(model, constants.ENDPOINT)) from first
            try:
                proc, net = load(model)
            except OSError as e:
                raise ModelUnavailableError(_how_to(model)) from e
    # Older processor configs lack these; without them the image features would be silently ignored.
    if getattr(proc, "num_query_tokens", None) is None:
        proc.num_query_tokens = net.config.num_query_tokens
    if net.config.image_token_index is None:
        net.config.image_token_index = proc.tokenizer.convert_tokens_to_ids(proc.image_token.content)
    proc.tokenizer.padding_side = "left"  # decoder-only generation continues after the last real token
    return proc, net.to(device).eval()


def _resolve_dtype(dtype, device):
    import torch
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {name!r} (e.g. 'float16', 'bfloat16', 'float32')")
    return dtype


class Blip2Labeler:
    """Callable (list[PIL.Image], list[question]) -> list[answer] backed by a BLIP-2 checkpoint (greedy)."""

    def __init__(self, model: str = DEFAULT_MODEL, *, device=None, dtype=None, max_new_tokens: int = 10):
        import torch
        self.model_id = str(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.processor, self.model = load_blip2(self.model_id, device=self.device, dtype=self.dtype)

    def __call__(self, images: list, questions: list[str]) -> list[str]:
        import torch
        inputs = self.processor(images=images, text=questions, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        ids = inputs["input_ids"]
        if out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]  # decoder-only generate returns the prompt first
        return [s.strip() for s in self.processor.batch_decode(out, skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class LabelStats:
    total: int        # images asked for
    labelled: int     # newly labelled in this run
    reused: int       # taken from the existing labels file
    unusable: int     # of `total`, records whose answer gave no attribute (attribute None)
    path: str = ""
    model: str = ""

    def summary(self) -> str:
        pct = 100.0 * self.unusable / self.total if self.total else 0.0
        return (f"labels: {self.total} images, {self.labelled} newly labelled, {self.reused} reused, "
                f"{self.unusable} without a usable attribute ({pct:.1f}%) -> {self.path}")

    __str__ = summary


def _check_items(items) -> list[tuple[str, object, str]]:
    from PIL import Image
    items = list(items)
    if not items:
        raise ValueError("label_images: no items to label (empty sequence)")
    out, seen, dup = [], set(), []
    for j, it in enumerate(items):
        if not isinstance(it, (tuple, list)) or len(it) != 3:
            raise ValueError(f"label_images: item {j} must be (id, image path or PIL image, classname), got {it!r}")
        iid, img, cls = it
        iid = str(iid)
        if not isinstance(cls, str) or not cls.strip():
            raise ValueError(f"label_images: item {j} (id {iid!r}) has no class name")
        if not isinstance(img, (str, os.PathLike, Image.Image)):
            raise TypeError(f"label_images: item {j} (id {iid!r}): image must be a path or PIL image, "
                            f"got {type(img).__name__}")
        if iid in seen:
            dup.append(iid)
        seen.add(iid)
        out.append((iid, img, cls))
    if dup:
        raise ValueError(f"label_images: duplicate image ids {sorted(set(dup))[:5]} ({len(dup)} duplicates)")
    return out


def _check_images(todo) -> None:
    from PIL import Image, UnidentifiedImageError
    bad = []
    for iid, img, _ in todo:
        if isinstance(img, Image.Image):
            continue
        try:
            with Image.open(img) as im:
                im.size
        except (OSError, UnidentifiedImageError) as e:
            bad.append(f"{os.fspath(img)} ({type(e).__name__}: {e})")
    if bad:
        raise ValueError(f"label_images: {len(bad)} unreadable image file(s), e.g. " + "; ".join(bad[:3]))


def _labeler_name(labeler, model: str) -> str:
    """The 'model' field of new records: the BLIP-2 id / folder, or the callable's model_id or name."""
    if labeler is None:
        return str(model)
    name = getattr(labeler, "model_id", None)
    if name:
        return str(name)
    fn = labeler if hasattr(labeler, "__qualname__") else type(labeler)
    return f"callable:{getattr(fn, '__module__', '?')}.{fn.__qualname__}"


def _load_rgb(img):
    from PIL import Image
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    with Image.open(img) as im:
        return im.convert("RGB")


def label_images(items: Sequence[tuple], out_path: str | os.PathLike, *, model: str = DEFAULT_MODEL,
                 question: str = DEFAULT_QUESTION, batch_size: int = 8, device=None, dtype=None,
                 labeler: Callable[[list, list[str]], list[str]] | None = None, progress: bool = True,
                 max_new_tokens: int = 10) -> LabelStats:
    """Label every (id, image, classname) of `items` into the labels file `out_path`; resumable.

    Records already in `out_path` for the same id and class are reused, not recomputed (and no model is loaded
    when nothing is left to do). Each batch is appended and fsync-ed before the next starts, so an
    interruption loses at most the batch in flight. `question` gets the class name in place of "{}".
    `labeler(images, questions) -> answers` replaces BLIP-2; its records carry `labeler.model_id` if it has
    one, else "callable:<qualified name>".
    """
    from tqdm.auto import tqdm
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if labeler is not None and not callable(labeler):
        raise TypeError(f"labeler must be callable (images, questions) -> answers, got {type(labeler).__name__}")
    items = _check_items(items)
    out_path = Path(out_path)
    existing, repair = scan_labels(out_path) if out_path.exists() else ({}, False)
    todo = [it for it in items if it[0] not in existing or existing[it[0]]["class"] != it[2]]
    stale = sum(1 for it in todo if it[0] in existing)
    if stale:
        warnings.warn(f"{out_path}: {stale} record(s) have a different class than now; relabelling them",
                      stacklevel=2)
    if todo:
        _check_images(todo)
        if labeler is None:
            labeler = Blip2Labeler(model, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
        if repair:
            write_labels(out_path, existing)
        else:
            out_path.parent.mkdir(parents=True, exist_ok=True)
        name = _labeler_name(labeler, model)
        bar = tqdm(total=len(todo), desc="BLIP-2 labels", unit="img", disable=not progress)
        try:
            for s in range(0, len(todo), batch_size):
                batch = todo[s:s + batch_size]
                images = [_load_rgb(img) for _, img, _ in batch]
                questions = [question.replace("{}", cls) for _, _, cls in batch]
                answers = list(labeler(images, questions))
                if len(answers) != len(batch) or not all(isinstance(a, str) for a in answers):
                    raise ValueError(f"labeler returned {len(answers)} answers for {len(batch)} images "
                                     f"(need one string per image)")
                recs = [{"id": iid, "class": cls, "answer": a, "attribute": parse_answer(a, cls), "model": name}
                        for (iid, _, cls), a in zip(batch, answers)]
                append_records(out_path, recs)
                existing.update((r["id"], r) for r in recs)
                bar.update(len(batch))
        finally:
            bar.close()
    unusable = sum(1 for iid, _, _ in items if existing[iid]["attribute"] is None)
    return LabelStats(total=len(items), labelled=len(todo), reused=len(items) - len(todo), unusable=unusable,
                      path=str(out_path), model=_labeler_name(labeler, model))
