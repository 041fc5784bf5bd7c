"""The batched per-instance text encoder: CLIP text features of N class names under B per-image prompt prefixes.

    encode_prompts(clip, prefix [B, P, D], classnames, suffix="{}.") -> [B, N, E]

Prompt of image b for class c: [prefix_b (P input embeddings, SOS first)] [tokens of suffix.format(c)] [EOT],
exactly what open_clip's encode_text computes on the full 77-token sequence, but with FAST_PATH.md's exact
tricks: nothing after EOT; the prefix runs through the layers once per image and leaves its K/V; the suffixes
of all prompts are packed at their true lengths (GEMMs over packed rows); attention is the prefix-shared op;
layer 0's suffix work depends on the class only and runs once per class; the last layer runs on EOT rows only.
A QuickGELU MLP, c_proj(h * sigmoid(1.702 h)) with h = c_fc(x), runs as c_proj'(silu(c_fc'(x))): the GEMMs scale
by 1.702 (c_fc, weight and bias) and 1 / 1.702 (c_proj's product) inside themselves (addmm's alpha / beta), so
the activation is one elementwise pass instead of three; equal in real arithmetic, to float rounding in floats.

In inference (autograd off) the suffix pass writes its wide GEMMs' outputs (QKV, MLP hidden) into buffers that
it reuses layer after layer, and adds the residuals in place (`Scratch`): on glibc a fresh tensor of tens of MB
is a fresh mmap whose page faults cost about as much as a pass over it (with the allocating path, 15 % of fp32
fast_logits at 2 x 1000 on a 2-core CPU); values equal the allocating path's up to the order of two float
additions ((x + a W) + b against x + (a W + b)).

Deep text prompts (`deep`, J - 1 tensors [n, D] or [B, n, D]): at the input of layer j = 1..J-1 the hidden states
of positions 1..n (the context, after SOS) are replaced by deep[j - 1]. Those positions are in the prefix, and
the prefix never attends to the suffixes (causal), so this changes the prefix pass only: the suffixes see the
replaced prefix through its K / V.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vision import QUICK, block_mlp, mlp_hidden, plain_mlp, quick_gelu_mlps
from .ops.prefix_attention import HostSegments, prefix_attention

__all__ = ["ClassSuffixes", "class_suffixes", "encode_prompts", "template_features", "TextTower"]


@dataclass(frozen=True)
class ClassSuffixes:
    """The token suffixes of a class list, packed. ids [T] (EOT closes each segment), pos [T] position of each
    token within its segment, cu [N+1] int32 offsets, eot [N] rows of the EOT tokens, max_len the longest;
    host: what the host knows of cu (prefix_attention checks the offsets with it, no device read)."""

    ids: torch.Tensor
    pos: torch.Tensor
    cu: torch.Tensor
    eot: torch.Tensor
    max_len: int
    lengths: tuple[int, ...]
    host: HostSegments

    def to(self, device) -> "ClassSuffixes":
        return ClassSuffixes(self.ids.to(device), self.pos.to(device), self.cu.to(device), self.eot.to(device),
                             self.max_len, self.lengths, self.host)

    def chunk(self, start: int, stop: int) -> "ClassSuffixes":
        """The classes start:stop, re-based to offset 0."""
        a = sum(self.lengths[:start])                  # from the host copy: no device sync, no graph break
        b = a + sum(self.lengths[start:stop])
        return ClassSuffixes(self.ids[a:b], self.pos[a:b], self.cu[start:stop + 1] - a, self.eot[start:stop] - a,
                             max(self.lengths[start:stop]), self.lengths[start:stop],
                             HostSegments.of(self.lengths[start:stop]))

    def chunks(self, B: int, max_rows: int) -> list["ClassSuffixes"]:
        """The class chunks of about max_rows packed rows (B images x suffix tokens) each, planned on the host
        (at least one class per chunk); the whole list itself when it fits."""
        N, start, out = len(self.lengths), 0, []
        while start < N:
            stop, rows = start, 0
            while stop < N and (stop == start or rows + B * self.lengths[stop] <= max_rows):
                rows += B * self.lengths[stop]
                stop += 1
            out.append(self if (start, stop) == (0, N) else self.chunk(start, stop))
            start = stop
        return out


@functools.lru_cache(maxsize=64)
def _suffix_tokens(tokenizer, classnames: tuple[str, ...], suffix: str) -> tuple[tuple[int, ...], ...]:
    eot = tokenizer.eot_token_id
    return tuple(tuple(tokenizer.encode(suffix.format(name))) + (eot,) for name in classnames)


def class_suffixes(tokenizer, classnames, suffix: str = "{}.", prefix_len: int = 0,
                   context_length: int = 77) -> ClassSuffixes:
    """Tokenise (cached) and validate a class list. Raises ValueError naming the bad input before any work."""
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list of names, not one string")
    classnames = tuple(classnames)
    if not classnames:
        raise ValueError("the class list is empty")
    bad = [repr(c) for c in classnames if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings; got {', '.join(bad[:5])}")
    if "{}" not in suffix:
        raise ValueError(f"suffix {suffix!r} must contain '{{}}' where the class name goes")
    toks = _suffix_tokens(tokenizer, classnames, suffix)
    room = context_length - prefix_len
    long = [(c, len(t)) for c, t in zip(classnames, toks) if len(t) > room]
    if long:
        name, n = long[0]
        raise ValueError(f"class name {name!r} is too long: its prompt needs {prefix_len} prefix + {n} suffix "
                         f"tokens (EOT included) > the text context of {context_length}"
                         + (f" ({len(long)} names too long)" if len(long) > 1 else ""))
    lengths = tuple(len(t) for t in toks)
    cu = torch.zeros(len(toks) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    ids = torch.tensor([i for t in toks for i in t], dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ClassSuffixes(ids, pos, cu, cu[1:].long() - 1, max(lengths), lengths, HostSegments.of(lengths))


class Scratch:
    """Output buffers of one suffix pass in inference, reused layer after layer: get(name, shape, like) is an
    uninitialised tensor of that shape with like's dtype and device, the same one each time it is asked for."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        t = self._bufs.get(name)
        if t is None or t.shape != torch.Size(shape) or t.dtype != like.dtype or t.device != like.device:
            t = self._bufs[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t


class TextTower:
    """A read-only view of an open_clip CLIP text tower, run the fast way. Weights are the model's own."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = list(model.transformer.resblocks)
        self.heads = self.blocks[0].attn.num_heads
        self.width = model.token_embedding.weight.shape[1]
        self.context_length = model.positional_embedding.shape[0]
        self._quick = quick_gelu_mlps(self.blocks)
        self._reuse = all(isinstance(b.ls_1, nn.Identity) and isinstance(b.ls_2, nn.Identity)
                          and b.attn.out_proj.bias is not None
                          and plain_mlp(b.mlp) for b in self.blocks)

    # --- pieces of one open_clip ResidualAttentionBlock -------------------------------------------------------
    def _qkv(self, blk, h: torch.Tensor, which: slice = slice(0, 3), s: Scratch | None = None) -> torch.Tensor:
        """h [..., D] -> [..., n, H, Dh]: the q/k/v projections selected by `which` (n of them)."""
        D = self.width
        W = blk.attn.in_proj_weight.view(3, D, D)[which].reshape(-1, D)
        b = blk.attn.in_proj_bias.view(3, D)[which].reshape(-1)
        if s is None:
            y = F.linear(h, W, b)
        else:
            rows = h.reshape(-1, D)
            y = torch.addmm(b, rows, W.t(), out=s.get("qkv", (rows.shape[0], W.shape[0]), rows)).view(
                *h.shape[:-1], -1)
        return y.unflatten(-1, (-1, self.heads, D // self.heads))

    def _finish(self, blk, x: torch.Tensor, attn: torch.Tensor, s: Scratch | None = None) -> torch.Tensor:
        """Residual + out-projection, then the MLP half of the block. attn [..., H, Dh]. With s (inference) and
        x a contiguous tensor of the pass's own, x is updated in place and the MLP's hidden rows reuse a buffer."""
        if s is None:
            x = x + blk.ls_1(blk.attn.out_proj(attn.flatten(-2)))
            return x + blk.ls_2(self._mlp(blk, blk.ln_2(x)))
        D, out = self.width, blk.attn.out_proj
        if x.shape != attn.shape[:-2] + (D,) or not x.is_contiguous():   # layer 0: x [T, D] is every image's
            x = x + out(attn.flatten(-2))
            xr = x.view(-1, D)
        else:
            xr = x.view(-1, D)
            xr.addmm_(attn.reshape(-1, D), out.weight.t()).add_(out.bias)
        h = blk.ln_2(xr)
        y = mlp_hidden(blk, h, self._quick, s.get("mlp", (h.shape[0], blk.mlp.c_fc.out_features), h))
        proj = blk.mlp.c_proj
        xr.addmm_(y, proj.weight.t(), alpha=1 / QUICK if self._quick else 1).add_(proj.bias)
        return x

    def _mlp(self, blk, h: torch.Tensor) -> torch.Tensor:
        """blk.mlp(h) for h [..., D]; a QuickGELU MLP with its 1.702 folded into the GEMMs (module docstring)."""
        return block_mlp(blk, h) if self._quick else blk.mlp(h)

    # --- the two passes ---------------------------------------------------------------------------------------
    def prefix_pass(self, prefix: torch.Tensor, deep=()) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the prefix [B, P, D] through every layer once, the deep tokens (module docstring) replacing the
        context at the input of layers 1..len(deep); return each layer's (K, V) [B, P, H, Dh]."""
        B, P = prefix.shape[:2]
        x = prefix + self.model.positional_embedding[:P].to(prefix.dtype)
        kv = []
        for i, blk in enumerate(self.blocks):
            if 1 <= i <= len(deep):
                t = deep[i - 1].to(x.dtype)
                t = t.expand(B, -1, -1) if t.dim() == 2 else t
                x = torch.cat([x[:, :1], t, x[:, 1 + t.shape[1]:]], 1)
            q, k, v = self._qkv(blk, blk.ln_1(x)).unbind(-3)
            kv.append((k, v))
            if i + 1 < len(self.blocks):  # the last layer's prefix outputs reach no EOT token
                a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True)
                x = self._finish(blk, x, a.transpose(1, 2))
        return kv

    def suffix_pass(self, kv, suf: ClassSuffixes, P: int, dtype) -> torch.Tensor:
        """Packed suffixes of N classes for B images against the prefix K/V: text features [B, N, E]."""
        model, B = self.model, kv[0][0].shape[0]
        scale = (self.width // self.heads) ** -0.5
        s = Scratch() if self._reuse and not (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
                                              or torch.is_autocast_enabled("cuda")) else None
        # Layer-0 input depends on the class only: [T, D], shared by all images.
        x = (model.token_embedding(suf.ids) + model.positional_embedding[P + suf.pos]).to(dtype)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            pk, pv = kv[i]
            h = blk.ln_1(x)
            if i < last:
                q, k, v = self._qkv(blk, h, s=s).expand(B, -1, -1, -1, -1).unbind(-3) if i == 0 else \
                    self._qkv(blk, h, s=s).unbind(-3)
                a = prefix_attention(q, k, v, pk, pv, suf.cu, suf.cu, suf.max_len, suf.max_len, scale,
                                     host_q=suf.host, host_k=suf.host)
                x = self._finish(blk, x, a, s)                      # layer 0: [T, D] + [B, T, D] -> [B, T, D]
            else:                                                    # last layer: queries and MLP at EOT only
                k, v = self._qkv(blk, h, slice(1, 3)).unbind(-3)
                if i == 0:
                    k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
                h_eot, x_eot = h[..., suf.eot, :], x[..., suf.eot, :]
                q = self._qkv(blk, h_eot, slice(0, 1)).squeeze(-3)
                if i == 0:
                    q, x_eot = q.expand(B, -1, -1, -1), x_eot.expand(B, -1, -1)
                ones = torch.arange(len(suf.lengths) + 1, dtype=torch.int32, device=suf.cu.device)
                a = prefix_attention(q, k, v, pk, pv, ones, suf.cu, 1, suf.max_len, scale,
                                     host_q=HostSegments.uniform(len(suf.lengths)), host_k=suf.host)
                x = self._finish(blk, x_eot, a, s)                   # [B, N, D]
        x = model.ln_final(x)
        proj = model.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj.to(x.dtype)

    def encode(self, prefix: torch.Tensor, suf: ClassSuffixes, max_rows: int = 1 << 16, deep=()) -> torch.Tensor:
        """Text features [B, N, E]; classes are processed in chunks of about max_rows packed rows (B x tokens)."""
        kv = self.prefix_pass(prefix, deep)
        P, B = prefix.shape[1], prefix.shape[0]
        outs = [self.suffix_pass(kv, part, P, prefix.dtype) for part in suf.chunks(B, max_rows)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _check_prefix(prefix: torch.Tensor, tower: TextTower) -> None:
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 3 or prefix.shape[-1] != tower.width:
        shape = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__
        raise ValueError(f"prefix must be a [B, P, {tower.width}] tensor of input embeddings; got {shape}")
    if prefix.shape[0] < 1 or prefix.shape[1] < 1:
        raise ValueError(f"prefix needs B >= 1 images and P >= 1 tokens (SOS first); got {tuple(prefix.shape)}")
    if not prefix.is_floating_point():
        raise ValueError(f"prefix must be floating point, got {prefix.dtype}")


def encode_prompts(clip, prefix: torch.Tensor, classnames, *, suffix: str = "{}.", tokenizer=None,
                   max_rows: int = 1 << 16, deep=()) -> torch.Tensor:
    """CLIP text features of every (image, class) prompt: [B, N, E]. Differentiable in `prefix`.

    clip: an open_clip CLIP model (or `intcoop.clip.Clip`); prefix: [B, P, D] input embeddings starting
    with SOS (no positional embedding added); classnames: N names (duplicates allowed); suffix: the text after
    the prefix, '{}' replaced by the name (EOT follows). tokenizer: open_clip's for the model (default: CLIP's BPE,
    one cached instance, `clip.default_tokenizer`, so repeated calls re-use its class-suffix cache).
    deep: deep text tokens, J - 1 tensors [n, D] or [B, n, D] (module docstring), n < P.
    """
    from .clip import Clip, _tokenizer_for

    if isinstance(clip, Clip):
        tokenizer, clip = tokenizer or clip.tokenizer, clip.model
    tokenizer = tokenizer or _tokenizer_for(clip, None)
    tower = TextTower(clip)
    _check_prefix(prefix, tower)
    _check_deep(deep, prefix, tower)
    suf = class_suffixes(tokenizer, classnames, suffix, prefix.shape[1], tower.context_length)
    return tower.encode(prefix, suf.to(prefix.device), max_rows, deep)


@torch.no_grad()
def template_features(clip, tokenizer, templates, classnames, max_rows: int = 1 << 16,
                      batch_size: int = 256) -> torch.Tensor:
    """encode_text(t.format(c)) of every template t and class name c: [T, N, E] float32, the fast way.

    A template splits at its "{}" into a head and a tail: SOS + the head's tokens are a prefix, run through the
    tower once, and "{}" + tail is the suffix of every class, packed (`encode_prompts`). That is the whole
    prompt's tokenisation whenever the head ends in a space (CLIP's BPE never joins across one); it is checked
    per template, and a template where it differs for some class, or whose prompt exceeds the context (which
    encode_text truncates), goes through clip.encode_text instead, batch_size prompts at a time."""
    if not classnames:
        raise ValueError("the class list is empty")
    tower = TextTower(clip)
    emb = clip.token_embedding
    dev = emb.weight.device
    out = []
    for t in templates:
        head, _, tail = t.partition("{}")
        ids = [tokenizer.sot_token_id] + list(tokenizer.encode(head))
        split = [tuple(ids[1:]) + s[:-1] for s in _suffix_tokens(tokenizer, tuple(classnames), "{}" + tail)]
        whole = [tuple(tokenizer.encode(t.format(c))) for c in classnames]
        if split == whole and 2 + max(map(len, whole)) <= tower.context_length:
            suf = class_suffixes(tokenizer, classnames, "{}" + tail, len(ids), tower.context_length).to(dev)
            feats = tower.encode(emb(torch.tensor([ids], device=dev)), suf, max_rows)[0]
        else:
            texts = [t.format(c) for c in classnames]
            feats = torch.cat([clip.encode_text(tokenizer(texts[i:i + batch_size]).to(dev))
                               for i in range(0, len(texts), batch_size)])
        out.append(feats.float())
    return torch.stack(out)


def _check_deep(deep, prefix: torch.Tensor, tower: TextTower) -> None:
    B, P, D = prefix.shape
    if len(deep) > len(tower.blocks) - 1:
        raise ValueError(f"deep has {len(deep)} layers of tokens but the text tower has {len(tower.blocks)} layers "
                         f"(at most {len(tower.blocks) - 1}: layer 0 takes the prefix)")
    for j, t in enumerate(deep):
        ok = isinstance(t, torch.Tensor) and t.dim() in (2, 3) and t.shape[-1] == D and t.shape[-2] < P \
            and (t.dim() == 2 or t.shape[0] == B)
        if not ok:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"deep[{j}] must be [n, {D}] or [{B}, n, {D}] with n < P = {P}; got {shape}")
