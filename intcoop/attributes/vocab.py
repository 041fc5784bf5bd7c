"""Attribute words <-> CLIP token embeddings: training targets, decoding embeddings into words, agreement.

Owns (METHOD.md, "Attribute labels" and "Interpretability"):
  attribute_targets(words, clip, tokenizer) -> AttributeTargets(emb [n, D], valid [n] bool)
      target of a word = mean of CLIP's token embeddings of its BPE tokens; None / empty words are masked.
  decode(emb [B, D], clip, tokenizer, k) -> per row the k nearest token-table entries by cosine, as words.
  agreement(pred_emb [B, D], target_words, clip, tokenizer) -> top-k agreement with the labels + mean cosine.

`clip` is an open_clip CLIP model (token table `clip.token_embedding.weight` [V, D]; CustomTextCLIP's
`clip.text.token_embedding` also works) and `tokenizer` its open_clip SimpleTokenizer (CLIP BPE: `.encode`
without SOT/EOT, `.decoder` id -> token string where a word-final token ends with "</w>").

Which tokens count as words: a word-final token ("red</w>") whose text is alphabetic AND an English word of the
`english-words` package's web2 list (Webster's 2nd, 234k words). CLIP's BPE also has word-final pieces of longer
words ("omusic</w>", "tok</w>"): they are never shown as words.
"""
from __future__ import annotations

import functools
import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

_WORD_END = "</w>"
# Per tokenizer instance: (bool mask [V] of whole alphabetic word tokens, readable string of every token).
_VOCAB_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class AttributeTargets(NamedTuple):
    emb: torch.Tensor    # [n, D] float32 target embeddings (zeros where not valid)
    valid: torch.Tensor  # [n] bool: the word gave at least one BPE token


def token_table(clip) -> torch.Tensor:
    """CLIP's token-embedding table [V, D] (a view of the parameter, no copy)."""
    for owner in (clip, getattr(clip, "text", None)):
        emb = getattr(owner, "token_embedding", None)
        if isinstance(emb, torch.nn.Embedding):
            return emb.weight
    raise TypeError(f"{type(clip).__name__} has no token_embedding (need an open_clip CLIP / CustomTextCLIP)")


def _check_tokenizer(tokenizer) -> None:
    if not (hasattr(tokenizer, "encode") and isinstance(getattr(tokenizer, "decoder", None), dict)):
        raise TypeError(f"need open_clip's SimpleTokenizer (.encode, .decoder), got {type(tokenizer).__name__}")


def word_token_ids(word: str | None, tokenizer) -> list[int]:
    """BPE token ids of `word` (lower-cased by the tokenizer), without SOT/EOT; [] for None / blank."""
    _check_tokenizer(tokenizer)
    if word is None or not str(word).strip():
        return []
    return list(tokenizer.encode(str(word)))


def attribute_targets(words: Sequence[str | None], clip, tokenizer) -> AttributeTargets:
    """Target embedding of each attribute word: mean of its BPE tokens' rows of CLIP's token table.

    Returns AttributeTargets(emb [n, D] float32 on the table's device, valid [n] bool). Rows of None,
    empty or token-less words are zeros with valid False (mask them out of the attribute loss).
    """
    table = token_table(clip).detach()
    n, D = len(words), table.shape[1]
    emb = torch.zeros(n, D, dtype=torch.float32, device=table.device)
    valid = torch.zeros(n, dtype=torch.bool, device=table.device)
    for i, w in enumerate(words):
        ids = word_token_ids(w, tokenizer)
        if ids:
            emb[i] = table[torch.tensor(ids, device=table.device)].float().mean(0)
            valid[i] = True
    return AttributeTargets(emb, valid)


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Lower-case alphabetic English words (web2), read once."""
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["web2"], lower=True, alpha=True))


def _vocab(tokenizer, V: int) -> tuple[torch.Tensor, list[str]]:
    """(mask [V] of word tokens: word-final, alphabetic ASCII, an English word; readable strings), cached per
    tokenizer."""
    _check_tokenizer(tokenizer)
    try:
        hit = _VOCAB_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        hit = None
    if hit is not None and hit[0].numel() == V:
        return hit
    dec, byte_dec = tokenizer.decoder, getattr(tokenizer, "byte_decoder", None)
    mask = torch.zeros(V, dtype=torch.bool)
    words, dictionary = [], english_words()
    for i in range(V):
        tok = dec.get(i, "")
        whole = tok.endswith(_WORD_END)
        core = tok[:-len(_WORD_END)] if whole else tok
        if byte_dec is not None and all(c in byte_dec for c in core):
            core = bytearray(byte_dec[c] for c in core).decode("utf-8", errors="replace")
        words.append(core)
        mask[i] = whole and core.isascii() and core.isalpha() and core.lower() in dictionary
    hit = (mask, words)
    try:
        _VOCAB_CACHE[tokenizer] = hit
    except TypeError:
        pass
    return hit


def decode(emb: torch.Tensor, clip, tokenizer, k: int = 5, words_only: bool = True) -> list[list[tuple[str, float]]]:
    """The k entries of CLIP's token table nearest to each row of emb [B, D] by cosine, best first.

    words_only: only word tokens ("red</w>"; not the piece "xy", nor "!!</w>", nor the word-final fragment
    "omusic</w>": see the module docstring).
    Returns B lists of (word without "</w>", cosine).
    """
    if emb.dim() != 2:
        raise ValueError(f"decode expects emb [B, D], got shape {tuple(emb.shape)}")
    table = token_table(clip).detach()
    if emb.shape[1] != table.shape[1]:
        raise ValueError(f"emb width {emb.shape[1]} != token embedding width {table.shape[1]}")
    mask, words = _vocab(tokenizer, table.shape[0])
    with torch.no_grad():
        t = table.float()
        cos = F.normalize(emb.detach().to(t.device).float(), dim=-1) @ t.T / t.norm(dim=-1).clamp_min(1e-12)
        if words_only:
            cos = cos.masked_fill(~mask.to(cos.device), float("-inf"))
        kk = min(k, int(mask.sum()) if words_only else table.shape[0])
        val, idx = cos.topk(kk, dim=-1)
    return [[(words[j], float(v)) for v, j in zip(vr.tolist(), ir.tolist())] for vr, ir in zip(val, idx)]


def agreement(pred_emb: torch.Tensor, target_words: Sequence[str | None], clip, tokenizer,
              ks: Sequence[int] = (1, 5)) -> dict:
    """How well predicted attribute embeddings pred_emb [B, D] match the label words (None = unlabelled).

    Over the n labelled rows: "top{k}" = fraction whose label is among the k decoded words (words_only), and
    "mean_cos" = mean cosine between prediction and the label's target embedding. Also "n" and "unlabelled".
    Values are nan when n == 0. A label that is not a single whole-word token can never match top-k.
    """
    if pred_emb.dim() != 2 or pred_emb.shape[0] != len(target_words):
        raise ValueError(f"pred_emb must be [B, D] with B = len(target_words) = {len(target_words)}, "
                         f"got {tuple(pred_emb.shape)}")
    tgt = attribute_targets(target_words, clip, tokenizer)
    keep = tgt.valid.cpu()
    n = int(keep.sum())
    out = {"n": n, "unlabelled": len(target_words) - n}
    if n == 0:
        out.update({f"top{k}": float("nan") for k in ks}, mean_cos=float("nan"))
        return out
    rows = keep.nonzero().flatten()
    labels = [str(target_words[i]).strip().lower() for i in rows.tolist()]
    pred = pred_emb.detach()[rows.to(pred_emb.device)]
    decoded = decode(pred, clip, tokenizer, k=max(ks), words_only=True)
    for k in ks:
        out[f"top{k}"] = sum(lab in [w for w, _ in d[:k]] for lab, d in zip(labels, decoded)) / n
    cos = F.cosine_similarity(pred.float().to(tgt.emb.device), tgt.emb[rows.to(tgt.emb.device)], dim=-1)
    out["mean_cos"] = float(cos.mean())
    return out
