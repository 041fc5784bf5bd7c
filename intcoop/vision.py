"""The prompted image tower (visual deep prompts, VPT-deep) on open_clip's VisionTransformer, and the plain-GEMM
form of open_clip's transformer blocks that it and the fast text encoder run.

    prompted_image_features(visual, images [B, 3, H, W], prompts [J tensors [n, Wv] or [B, n, Wv]], tokens)
        -> (f(x) [B, E], Z(x) [B, 1 + L, Wv] or None)
    block_mlp(blk, h [..., D]) -> blk.mlp(h), QuickGELU's 1.702 folded into the GEMMs (quick_gelu_mlps(blocks))
    mlp_hidden(blk, rows [R, D], quick, out=None) -> [R, 4D]: the hidden rows that block_mlp (and the text tower)
        feed c_proj
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip import _plain_vit

__all__ = ["prompted_image_features", "block_mlp", "mlp_hidden", "plain_mlp", "quick_gelu_mlps"]

QUICK = 1.702       # QuickGELU(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702


def plain_mlp(mlp) -> bool:
    """True when mlp is open_clip's Sequential(c_fc: Linear, gelu, c_proj: Linear), biases included."""
    return isinstance(mlp, nn.Sequential) and list(mlp._modules) == ["c_fc", "gelu", "c_proj"] and all(
        isinstance(m, nn.Linear) and m.bias is not None for m in (mlp.c_fc, mlp.c_proj))


def quick_gelu_mlps(blocks) -> bool:
    """True when every block's MLP is open_clip's Linear -> QuickGELU -> Linear (the foldable form)."""
    from open_clip.transformer import QuickGELU
    return all(plain_mlp(getattr(b, "mlp", None)) and isinstance(b.mlp.gelu, QuickGELU) for b in blocks)


def block_mlp(blk, h: torch.Tensor) -> torch.Tensor:
    """blk.mlp(h), h [..., D], for a block whose MLP `quick_gelu_mlps` accepts: c_proj'(silu(c_fc'(h))) with
    QuickGELU's 1.702 inside the GEMMs (addmm's alpha / beta): one elementwise pass instead of three."""
    rows = h.reshape(-1, h.shape[-1])
    proj = blk.mlp.c_proj
    out = torch.addmm(proj.bias, mlp_hidden(blk, rows, True), proj.weight.t(), alpha=1 / QUICK)
    return out.view(*h.shape[:-1], out.shape[-1])


def mlp_hidden(blk, rows: torch.Tensor, quick: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP's hidden rows [R, 4D] of rows [R, D] (written into `out` when given, autograd off): gelu(c_fc(rows)),
    or with quick 1.702 x QuickGELU(c_fc(rows)) = silu(1.702 c_fc(rows)), which c_proj's GEMM then scales by
    1 / 1.702 (addmm's alpha)."""
    fc = blk.mlp.c_fc
    kw = {} if out is None else {"out": out}
    if not quick:
        return blk.mlp.gelu(torch.addmm(fc.bias, rows, fc.weight.t(), **kw))
    y = torch.addmm(fc.bias, rows, fc.weight.t(), beta=QUICK, alpha=QUICK, **kw)      # 1.702 * c_fc(h)
    return F.silu(y, inplace=out is not None)


def _vit_block(blk, x: torch.Tensor, quick: bool) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock (self-attention, no mask) on x [B, L, W], batch-first: the same math as
    blk(x) written with F.linear and scaled_dot_product_attention, so that a training step (autograd on, where
    nn.MultiheadAttention leaves its fused path) runs plain GEMMs in any dtype."""
    attn = blk.attn
    B, L, W = x.shape
    H = attn.num_heads
    qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, H, W // H)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                    # [B, H, L, Dh]
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W)
    x = x + blk.ls_1(attn.out_proj(a))
    h = blk.ln_2(x)
    return x + blk.ls_2(block_mlp(blk, h) if quick else blk.mlp(h))


def _plain_blocks(blocks) -> bool:
    """True when `_vit_block` computes what each block's forward does (open_clip's own block, one in-projection)."""
    from open_clip.transformer import ResidualAttentionBlock
    return all(type(b) is ResidualAttentionBlock and isinstance(b.attn, nn.MultiheadAttention)
               and b.attn._qkv_same_embed_dim and b.attn.in_proj_bias is not None and not hasattr(b, "ln_1_kv")
               and b.attn.dropout == 0 for b in blocks)


def prompted_image_features(visual: nn.Module, images: torch.Tensor, prompts, tokens: bool = True):
    """open_clip's VisionTransformer with learned tokens (VPT-deep): (f(x) [B, E], Z(x) [B, L, Wv] or None).

    prompts[0] [n, Wv] (or [B, n, Wv]) is appended after the class and patch tokens, after the positional
    embedding and before ln_pre; at the input of block j = 1..J-1 the last n tokens are replaced by prompts[j].
    The prompts' outputs are dropped before pooling, so f(x) is pooled as open_clip pools it (class token, or
    the mean of the patch tokens) and Z(x) holds the class and patch tokens only. Differentiable in the prompts.
    open_clip's own blocks run as `_vit_block` (the same math, plain GEMMs: fast with autograd on, in bf16 too).
    """
    if not _plain_vit(visual):
        raise ValueError(f"visual prompts need open_clip's plain VisionTransformer image tower; "
                         f"{type(visual).__name__} is another (set model.visual_prompts=off)")
    B = images.shape[0]
    layers = visual.transformer.resblocks
    if len(prompts) > len(layers):
        raise ValueError(f"{len(prompts)} layers of visual prompts but the image tower has {len(layers)} layers")

    def batch(t):
        t = t.to(x.dtype)
        return t.expand(B, -1, -1) if t.dim() == 2 else t

    x = visual.conv1(images).flatten(2).transpose(1, 2)                       # [B, grid**2, Wv]
    x = torch.cat([visual.class_embedding.view(1, 1, -1).to(x.dtype).expand(B, -1, -1), x], 1)
    x = visual.patch_dropout(x + visual.positional_embedding.to(x.dtype))
    n = prompts[0].shape[-2]
    x = visual.ln_pre(torch.cat([x, batch(prompts[0])], 1))
    first = getattr(visual.transformer, "batch_first", True)
    plain, quick = _plain_blocks(layers), quick_gelu_mlps(layers)
    for j, blk in enumerate(layers):
        if 1 <= j < len(prompts):
            x = torch.cat([x[:, :x.shape[1] - n], batch(prompts[j])], 1)
        if plain:
            x = _vit_block(blk, x, quick)
        else:
            x = blk(x) if first else blk(x.transpose(0, 1)).transpose(0, 1)
    x = visual.ln_post(x[:, :x.shape[1] - n])
    pooled, _ = visual._global_pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, (x if tokens else None)
