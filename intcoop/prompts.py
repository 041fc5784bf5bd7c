"""The prompt learner: context vectors, their instance conditioning, and the attribute extractor (METHOD.md).

    prefix(x) = [SOS, v_1(x) .. v_M(x), a_1(x) .. a_K(x)]          [B, P, D], P = 1 + M + K (K = 0: slot off)

Conditioning of the context vectors v_j [M, D] on the image:
    attention  v_j(x) = v_j + W_o MHA(q = v_j W_q, k = Z(x) W_k, v = Z(x) W_v), over the patch tokens Z(x) [B, L, Wv];
               W_k folded into the query and W_v applied after pooling (ops.patch_pool); W_o starts at zero.
    additive   v_j(x) = v_j + meta(f(x)), CoCoOp's meta-net E -> E/16 -> D.
    none       v_j(x) = v_j (CoOp).
Attribute tokens a(x) = A(f(x)): an MLP E -> hidden -> K*D (the "attribute extractor").
The meta-net and the attribute extractor read the L2-normalised image feature (as CoCoOp's meta-net does).
Words of the context init after the first M (e.g. "of a" of "a photo of a" with M = 2) stay fixed between the
context and the attribute tokens: prefix = [SOS, v(x), w, a(x)].

Deep prompts (README "Deep prompts"):
    deep_text [J_t - 1 tensors [M, D]]: replace the context positions 1..M at the input of text layers 1..J_t-1.
    text_depth 0: the context is a buffer (fixed at its init: VPT's hand-crafted text prompt).
    VisualPrompts.forward(ctx, deep_text) -> [J_v tensors [n_v, Wv]]: layer 0's tokens are appended to the image
    tokens, layer j's replace them at its input. independent: learned (IVLP, VPT); coupled (MaPLe): layer 0 is
    Linear(ctx), layer j Linear_j(deep_text[j - 1]), of the learned (unconditioned) context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.patch_pool import patch_pool

__all__ = ["PromptLearner", "CrossAttentionConditioner", "MetaNet", "AttributeExtractor", "VisualPrompts",
           "VISUAL_MODES"]

VISUAL_MODES = ("off", "independent", "coupled")


class CrossAttentionConditioner(nn.Module):
    """Multi-head cross-attention of M context vectors [M, D] over patch tokens [B, L, Wv] -> [B, M, D]."""

    def __init__(self, width: int, patch_width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"the text width {width} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(patch_width, width, bias=False)  # a key bias shifts every score equally: no effect
        self.v = nn.Linear(patch_width, width)
        self.o = nn.Linear(width, width)
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.o.bias)

    def folded_queries(self, ctx: torch.Tensor) -> torch.Tensor:
        """q~ [M*H, Wv]: each head's query times that head's block of W_k (row r = j * H + h)."""
        H, Dh = self.heads, self.head_dim
        q = self.q(ctx).view(-1, H, Dh)                                      # [M, H, Dh]
        return torch.einsum("mhd,hdw->mhw", q, self.k.weight.view(H, Dh, -1)).flatten(0, 1)

    def forward(self, ctx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        H, Dh = self.heads, self.head_dim
        dev = tokens.device.type
        if torch.is_autocast_enabled(dev) and tokens.dtype == torch.float32:
            # custom ops are not autocast: do what autocast would do for this matmul-like op (bf16 under a bf16
            # autocast: tensor-core kernels instead of the fp32 path, half the bytes of the patch tokens)
            tokens = tokens.to(torch.get_autocast_dtype(dev))
        pooled = patch_pool(self.folded_queries(ctx).to(tokens.dtype), tokens, Dh ** -0.5)   # [B, M*H, Wv]
        pooled = pooled.unflatten(1, (-1, H))                                               # [B, M, H, Wv]
        vals = torch.einsum("bmhw,hdw->bmhd", pooled, self.v.weight.view(H, Dh, -1).to(pooled.dtype))
        vals = vals + self.v.bias.view(H, Dh).to(vals.dtype)
        return ctx + self.o(vals.flatten(-2))

    def attention_maps(self, ctx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, M, H, L] of each context token and head over the patch tokens (for explain)."""
        s = torch.einsum("rw,blw->brl", self.folded_queries(ctx).to(tokens.dtype), tokens) * self.head_dim ** -0.5
        return s.softmax(-1).unflatten(1, (-1, self.heads))


class MetaNet(nn.Module):
    """CoCoOp's meta-net: normalised image feature [B, E] -> a shift [B, 1, D] added to every context vector."""

    def __init__(self, embed_dim: int, width: int):
        super().__init__()
        hidden = max(embed_dim // 16, 1)
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))

    def forward(self, ctx: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return ctx + self.net(feat).unsqueeze(1)


class AttributeExtractor(nn.Module):
    """A: normalised image feature [B, E] -> K attribute token embeddings [B, K, D]."""

    def __init__(self, embed_dim: int, hidden: int, width: int, tokens: int = 1):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, tokens * width))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(feat).view(-1, self.tokens, self.width)


class VisualPrompts(nn.Module):
    """The image tower's learned tokens per layer: forward(ctx [M, D], deep_text) -> [J_v tensors [n, Wv]]."""

    def __init__(self, mode: str, n: int, depth: int, width: int, visual_width: int):
        super().__init__()
        if mode not in ("independent", "coupled"):
            raise ValueError(f"visual_prompts must be one of {', '.join(VISUAL_MODES)}, got {mode!r}")
        self.mode, self.n, self.depth = mode, n, depth
        if mode == "independent":
            self.tokens = nn.ParameterList([nn.Parameter(torch.randn(n, visual_width) * 0.02) for _ in range(depth)])
        else:
            self.proj = nn.Linear(width, visual_width)
            one = nn.Linear(width, visual_width)          # the deeper projections start as copies of one layer
            self.projs = nn.ModuleList([_copy_linear(one) for _ in range(depth - 1)])

    def forward(self, ctx: torch.Tensor, deep_text) -> list[torch.Tensor]:
        if self.mode == "independent":
            return list(self.tokens)
        return [self.proj(ctx)] + [p(t) for p, t in zip(self.projs, deep_text)]


def _copy_linear(layer: nn.Linear) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features)
    out.load_state_dict(layer.state_dict())
    return out


class PromptLearner(nn.Module):
    """Learned context vectors, conditioning, attribute extractor and deep prompts; builds the per-image prefix
    [B, P, D], the deep text tokens and the visual tokens."""

    def __init__(self, token_embedding: torch.Tensor, sos_id: int, init_ids: list[int], *, n_ctx: int,
                 embed_dim: int, patch_width: int | None, conditioning: str = "attention", heads: int = 8,
                 attr_tokens: int = 1, attr_hidden: int = 512, seed: int = 0, text_depth: int = 1,
                 visual: dict | None = None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):   # every layer's init draws from `seed`, not the global RNG
            torch.manual_seed(seed)
            self._build(token_embedding, sos_id, init_ids, n_ctx, embed_dim, patch_width, conditioning, heads,
                        attr_tokens, attr_hidden)
            self._build_deep(token_embedding.shape[1], text_depth, visual)

    def _build(self, token_embedding, sos_id, init_ids, n_ctx, embed_dim, patch_width, conditioning, heads,
               attr_tokens, attr_hidden):
        width = token_embedding.shape[1]
        self.register_buffer("sos", token_embedding[sos_id].detach().clone(), persistent=False)
        if init_ids:
            if len(init_ids) < n_ctx:
                raise ValueError(f"context init has {len(init_ids)} tokens but n_ctx = {n_ctx}")
            ctx = token_embedding[torch.tensor(init_ids[:n_ctx])].detach().clone()
        else:
            ctx = torch.randn(n_ctx, width) * 0.02
        fixed = token_embedding[torch.tensor(init_ids[n_ctx:], dtype=torch.long)].detach().clone() \
            if len(init_ids) > n_ctx else token_embedding.new_zeros(0, width)
        self.register_buffer("fixed", fixed, persistent=False)
        self.ctx = nn.Parameter(ctx)
        self.conditioning = conditioning
        if conditioning == "attention":
            if patch_width is None:
                raise ValueError("attention conditioning needs a ViT image tower with patch tokens")
            self.cond = CrossAttentionConditioner(width, patch_width, heads)
        elif conditioning == "additive":
            self.cond = MetaNet(embed_dim, width)
        elif conditioning == "none":
            self.cond = None
        else:
            raise ValueError(f"conditioning must be 'attention', 'additive' or 'none', got {conditioning!r}")
        self.attr = AttributeExtractor(embed_dim, attr_hidden, width, attr_tokens) if attr_tokens > 0 else None

    def _build_deep(self, width, text_depth, visual):
        n_ctx = self.ctx.shape[0]
        if text_depth == 0:                               # the context is fixed: a buffer, kept in checkpoints
            ctx = self.ctx.detach()
            del self.ctx
            self.register_buffer("ctx", ctx)
        self.text_depth = text_depth
        self.deep_text = nn.ParameterList([nn.Parameter(torch.randn(n_ctx, width) * 0.02)
                                           for _ in range(max(text_depth - 1, 0))])
        self.visual = None
        if visual is not None and visual["mode"] != "off":
            self.visual = VisualPrompts(visual["mode"], visual["n"], visual["depth"], width, visual["width"])

    @property
    def prefix_len(self) -> int:
        return 1 + self.ctx.shape[0] + self.fixed.shape[0] + (self.attr.tokens if self.attr is not None else 0)

    @property
    def image_independent(self) -> bool:
        """True when the prefix is the same for every image (no conditioning, no attribute slot)."""
        return self.conditioning == "none" and self.attr is None

    def context(self, feat: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """v(x) [B, M, D] from the image feature [B, E] (raw) and patch tokens [B, L, Wv]."""
        B = feat.shape[0]
        if self.conditioning == "attention":
            return self.cond(self.ctx, tokens)
        if self.conditioning == "additive":
            return self.cond(self.ctx, F.normalize(feat, dim=-1))
        return self.ctx.unsqueeze(0).expand(B, -1, -1)

    def attributes(self, feat: torch.Tensor) -> torch.Tensor:
        """a(x) [B, K, D] predicted from the image feature [B, E]."""
        return self.attr(F.normalize(feat, dim=-1))

    def visual_tokens(self) -> list[torch.Tensor] | None:
        """The image tower's tokens per layer [J_v tensors [n, Wv]], or None (no visual prompts)."""
        return None if self.visual is None else self.visual(self.ctx, list(self.deep_text))

    def prefix(self, ctx: torch.Tensor, attrs: torch.Tensor | None) -> torch.Tensor:
        """[SOS, v(x), w, a(x)] -> [B, P, D] from ctx [B, M, D], the fixed words w and attrs [B, K, D] (or None)."""
        B = ctx.shape[0]
        parts = [self.sos.to(ctx.dtype).expand(B, 1, -1), ctx]
        if self.fixed.shape[0]:
            parts.append(self.fixed.to(ctx.dtype).expand(B, -1, -1))
        if attrs is not None:
            parts.append(attrs.to(ctx.dtype))
        return torch.cat(parts, 1)
