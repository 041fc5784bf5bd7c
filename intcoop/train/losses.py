"""The training objective of METHOD.md and the frozen text features its regulariser compares with.

    L = L_CE + lambda_attr * L_attr + lambda_reg * L_reg
          + lambda_scl_text * L_scl_text + lambda_scl_image * L_scl_image + lambda_scl_logits * L_scl_logits

(the last line: PromptSRC's self-regularisation, `selfreg`; 0 unless its lambdas are set)

- `cross_entropy(logits [B, N], labels [B])`: over the N training classes (float32).
- `attribute_loss(pred [B, K, D], target [B, D], valid [B], kind)`: per image `1 - cos(mean_k pred_k, target)`
  (kind="cosine") or `mean((mean_k pred_k - target)^2)` (kind="mse"), averaged over the images with a label;
  `denom` overrides the count (data parallel: the global count / world size, so that averaging the ranks'
  gradients gives the mean over every labelled image of the global batch). 0 when no image has a label.
- `regulariser_loss(text [B, N, E], hand [N, E] or [B, N, E])`: KgCoOp's `1 - mean_{b,c} cos(t_c(x_b), hand)`.
- `objective(...)`: the sum and its parts, as a dict of tensors {"loss", "ce", "attr", "reg", "scl_text",
  "scl_image", "scl_logits", "scl"} (for logging; "scl" is the weighted sum of the three SCL terms).
- `HandFeatures`: frozen CLIP text features of the hand-crafted prompts, computed once and cached:
  `classes()` [N, E] for "template.format(c)" (regulariser=class, `text.template_features`: encode_text's
  values through the fast encoder, under no_grad), and
  `for_words(words)` [B, N, E] for "a photo of a {a} {c}." (regulariser=attribute; None -> the class prompt),
  computed once per word with the fast text encoder (a prefix "[SOS] a photo of a {a}" and the packed suffixes
  "{c}." of the N classes: the same tokens as the full prompt, so the same features; tests check this against
  encode_text). `precompute(all words)` at the start makes a run reproducible bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..text import TextTower, class_suffixes, template_features
from . import selfreg

__all__ = ["cross_entropy", "attribute_loss", "regulariser_loss", "objective", "HandFeatures",
           "ATTRIBUTE_TEMPLATE", "ATTR_LOSSES", "REGULARISERS"]

ATTRIBUTE_TEMPLATE = "a photo of a {a} {c}."   # regulariser=attribute (METHOD.md)
ATTR_LOSSES = ("cosine", "mse")
REGULARISERS = ("off", "class", "attribute")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, N] against class indices [B], computed in float32."""
    return F.cross_entropy(logits.float(), labels)


def attribute_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str = "cosine",
                   denom: torch.Tensor | float | None = None) -> torch.Tensor:
    """Masked attribute loss. pred [B, K, D] (or [B, D]), target [B, D], valid [B] bool -> scalar float32.

    The K predicted tokens are averaged before the comparison. Rows with valid False contribute nothing (their
    target may hold anything, NaN included). The sum over valid rows is divided by `denom` (default: their count).
    """
    if kind not in ATTR_LOSSES:
        raise ValueError(f"attr_loss must be one of {', '.join(ATTR_LOSSES)}, got {kind!r}")
    p = (pred.mean(1) if pred.dim() == 3 else pred).float()
    t = torch.where(valid[:, None], target.float(), torch.ones_like(p))    # no NaN reaches the graph
    if kind == "cosine":
        per = 1 - F.cosine_similarity(p, t, dim=-1)
    else:
        per = (p - t).pow(2).mean(-1)
    total = (per * valid.to(per.dtype)).sum()
    if denom is None:
        denom = valid.sum()
    denom = torch.as_tensor(denom, dtype=per.dtype, device=per.device)
    return total / denom.clamp_min(1e-12)      # no labelled row: total is 0, so is the loss (no sync, no branch)


def regulariser_loss(text: torch.Tensor, hand: torch.Tensor) -> torch.Tensor:
    """KgCoOp: 1 - mean over images and classes of cos(t_c(x) [B, N, E], t_c^hand [N, E] or [B, N, E])."""
    hand = hand.to(text.device, torch.float32)
    if hand.dim() == 2:
        hand = hand.expand(text.shape[0], -1, -1)
    return 1 - F.cosine_similarity(text.float(), hand, dim=-1).mean()


def objective(logits: torch.Tensor, labels: torch.Tensor, *, pred_attrs: torch.Tensor | None = None,
              attr_target: torch.Tensor | None = None, attr_valid: torch.Tensor | None = None,
              attr_denom=None, text: torch.Tensor | None = None, hand: torch.Tensor | None = None,
              lambda_attr: float = 1.0, lambda_reg: float = 8.0, attr_loss: str = "cosine",
              feats: torch.Tensor | None = None, frozen_feats: torch.Tensor | None = None,
              frozen_text: torch.Tensor | None = None, zs_logits: torch.Tensor | None = None,
              lambda_scl_text: float = 0.0, lambda_scl_image: float = 0.0, lambda_scl_logits: float = 0.0) -> dict:
    """{"loss", "ce", "attr", "reg", "scl_text", "scl_image", "scl_logits", "scl"}: the weighted sum, its
    (unweighted) parts, and "scl" = the weighted sum of the three SCL parts; float32 scalars.

    A part whose inputs are None (no attribute slot or no labels; regulariser off) or whose lambda is 0 is 0 and
    adds nothing. SCL (`selfreg`): text [B', N, E] against frozen_text [N, E]; feats [B, E] (the model's image
    features) against frozen_feats [B, E]; logits against zs_logits [B, N].
    """
    for lam, name, need in ((lambda_scl_text, "lambda_scl_text", dict(text=text, frozen_text=frozen_text)),
                            (lambda_scl_image, "lambda_scl_image", dict(feats=feats, frozen_feats=frozen_feats)),
                            (lambda_scl_logits, "lambda_scl_logits", dict(zs_logits=zs_logits))):
        missing = [k for k, v in need.items() if v is None]
        if lam and missing:
            raise ValueError(f"{name}={lam} needs {' and '.join(missing)} (got None)")
    ce = cross_entropy(logits, labels)
    zero = ce.new_zeros(())
    attr = zero
    if pred_attrs is not None and attr_target is not None and lambda_attr:
        attr = attribute_loss(pred_attrs, attr_target, attr_valid, attr_loss, attr_denom)
    reg = regulariser_loss(text, hand) if text is not None and hand is not None and lambda_reg else zero
    s_text = selfreg.scl_text(text, frozen_text) if lambda_scl_text else zero
    s_image = selfreg.scl_image(feats, frozen_feats) if lambda_scl_image else zero
    s_logits = selfreg.scl_logits(logits, zs_logits) if lambda_scl_logits else zero
    scl = lambda_scl_text * s_text + lambda_scl_image * s_image + lambda_scl_logits * s_logits
    return {"loss": ce + lambda_attr * attr + lambda_reg * reg + scl, "ce": ce, "attr": attr, "reg": reg,
            "scl_text": s_text, "scl_image": s_image, "scl_logits": s_logits, "scl": scl}


class HandFeatures:
    """Frozen CLIP text features of the hand-crafted prompts of N classes (computed once, cached, no grad).

    clip: open_clip CLIP model; tokenizer: its open_clip tokenizer; template: the dataset's hand-crafted prompt
    with one "{}" ("a photo of a {}, a type of pet."). Features are float32 on `device` (default: the model's).
    """

    def __init__(self, clip, tokenizer, classnames: Sequence[str], template: str = "a photo of a {}.",
                 device=None, batch_size: int = 256):
        if not classnames:
            raise ValueError("the class list is empty")
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain '{{}}' where the class name goes")
        self.clip, self.tokenizer = clip, tokenizer
        self.classnames, self.template = list(classnames), template
        self.device = torch.device(device) if device is not None else clip.token_embedding.weight.device
        self.batch_size = batch_size
        self.words_per_chunk = 32
        self._classes: torch.Tensor | None = None
        self._words: dict[str, torch.Tensor] = {}
        self._tower: TextTower | None = None

    @torch.no_grad()
    def classes(self) -> torch.Tensor:
        """[N, E]: encode_text of template.format(c) for every class (regulariser=class)."""
        if self._classes is None:
            self._classes = template_features(self.clip, self.tokenizer, [self.template], self.classnames,
                                              batch_size=self.batch_size)[0].to(self.device)
        return self._classes

    @torch.no_grad()
    def precompute(self, words) -> None:
        """Compute and cache the features of `words` not cached yet ([N, E] each, "a photo of a {w} {c}." through
        the fast encoder). A word's features can differ in the last bits with the other words encoded in the same
        chunk: a trainer that must be reproducible (resume) calls this once with every word, in sorted order."""
        words = sorted({w for w in words if w is not None and w not in self._words})
        if not words:
            return
        if self._tower is None:
            self._tower = TextTower(self.clip)
        tok, emb = self.tokenizer, self.clip.token_embedding
        sos = tok.sot_token_id
        head, _, tail = ATTRIBUTE_TEMPLATE.partition("{c}")
        by_len: dict[int, list[tuple[str, list[int]]]] = {}
        for w in words:
            ids = [sos] + list(tok.encode(head.format(a=w).strip()))
            by_len.setdefault(len(ids), []).append((w, ids))
        dev = emb.weight.device
        for P, group in by_len.items():
            suf = class_suffixes(tok, self.classnames, "{}" + tail, P, self._tower.context_length).to(dev)
            for s in range(0, len(group), self.words_per_chunk):
                chunk = group[s:s + self.words_per_chunk]
                prefix = emb(torch.tensor([ids for _, ids in chunk], device=dev))
                feats = self._tower.encode(prefix, suf).float().to(self.device)    # [U, N, E]
                for (w, _), f in zip(chunk, feats):
                    self._words[w] = f

    def for_words(self, words: Sequence[str | None]) -> torch.Tensor:
        """[B, N, E]: per image, the features of "a photo of a {a} {c}." (its attribute a; None -> classes())."""
        self.precompute(words)
        cls = None
        rows = []
        for w in words:
            if w is None:
                cls = self.classes() if cls is None else cls
                rows.append(cls)
            else:
                rows.append(self._words[w])
        return torch.stack(rows)
