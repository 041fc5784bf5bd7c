"""The prompt learner against plain references written here from its own weights (METHOD.md "The prompt of image x").

- CrossAttentionConditioner (W_k folded into the query, W_v after pooling, through ops.patch_pool) against torch's
  own multi-head attention over the patch tokens: v_j(x) = v_j + W_o MHA(q = v_j W_q, k = Z W_k, v = Z W_v);
  values, gradients and attention maps, float64, W_o not zero, awkward sizes, non-contiguous tokens.
- The whole IntCoOp logits (attention / additive / no conditioning, predicted attributes, everything perturbed)
  against a reference built from scratch: open_clip's image tower, the MHA above or the meta-net by hand, the
  attribute MLP by hand, the prefix [SOS] v_1..v_M a(x) assembled by hand, then the 77-token text reference.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import intcoop
from intcoop.prompts import CrossAttentionConditioner
from intcoop.reference import encode_prompts_reference
from intcoop.testing import assert_close, perturb_prompt

NAMES = ["astronaut", "cat", "coffee", "crane", "crane", "t-shirt/top"]


def plain_mha(cond: CrossAttentionConditioner, ctx: torch.Tensor, tokens: torch.Tensor):
    """ctx [M, D], tokens Z [B, L, Wv] -> (v(x) [B, M, D], softmax weights [B, H, M, L]) by
    torch.nn.functional.multi_head_attention_forward with the conditioner's weights (no key bias: it has none)."""
    B, D = tokens.shape[0], ctx.shape[-1]
    query = ctx.unsqueeze(1).expand(-1, B, -1)                 # [M, B, D], sequence first
    z = tokens.transpose(0, 1)                                 # [L, B, Wv]
    in_bias = torch.cat([cond.q.bias, torch.zeros_like(cond.q.bias), cond.v.bias])
    out, weights = F.multi_head_attention_forward(
        query, z, z, D, cond.heads, None, in_bias, None, None, False, 0.0, cond.o.weight, cond.o.bias,
        training=False, need_weights=True, use_separate_proj_weight=True, q_proj_weight=cond.q.weight,
        k_proj_weight=cond.k.weight, v_proj_weight=cond.v.weight, average_attn_weights=False)
    return ctx + out.transpose(0, 1), weights


def _conditioner(D, Wv, H, seed):
    cond = CrossAttentionConditioner(D, Wv, H).double()
    perturb_prompt(SimpleNamespace(prompt=cond), seed=seed, std=0.1)    # W_o (zero at init) made non-zero
    assert cond.o.weight.abs().min() > 0
    return cond


@pytest.mark.parametrize("B,L,H,M", [(3, 197, 8, 4), (1, 13, 1, 3), (3, 13, 8, 1), (1, 197, 1, 4)])
def test_conditioner_equals_plain_multi_head_attention(B, L, H, M):
    D, Wv = 64, 40                        # patch width != text width: a transposed weight cannot pass
    cond = _conditioner(D, Wv, H, seed=B * L + H)
    g = torch.Generator().manual_seed(L + M)
    ctx = (torch.randn(M, D, generator=g, dtype=torch.float64) * 2).requires_grad_()
    base = torch.randn(L, B, Wv + 5, generator=g, dtype=torch.float64).requires_grad_()
    tokens = base.transpose(0, 1)[..., 2:Wv + 2]             # [B, L, Wv], non-contiguous
    assert not tokens.is_contiguous()

    got = cond(ctx, tokens)
    ref, weights = plain_mha(cond, ctx, tokens)
    assert got.shape == (B, M, D)
    assert_close(got, ref, torch.float64)
    assert (got - ctx).abs().max() > 1e-2                    # the attention term is really there
    assert weights.amax(-1).min() > 1.5 / L                  # and its softmax is far from uniform

    leaves = [ctx, base, *cond.parameters()]
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), leaves)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    names = ["ctx", "patch tokens"] + [n for n, _ in cond.named_parameters()]
    for name, a, b in zip(names, g_got, g_ref):
        assert b.abs().sum() > 0, name
        assert_close(a, b, torch.float64, msg=name)

    maps = cond.attention_maps(ctx, tokens)
    assert maps.shape == (B, M, H, L)
    assert_close(maps, weights.permute(0, 2, 1, 3), torch.float64)


def _open_clip_image_outputs(clip_model, x):
    """f(x) by open_clip's encode_image, and Z(x) = every token after its ln_post (class token first), caught by
    a forward hook: the image side without intcoop.clip.image_features."""
    seen = []
    hook = clip_model.visual.ln_post.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            f = clip_model.encode_image(x)
    finally:
        hook.remove()
    (z,) = seen
    return f, z


def _mlp(seq, x):
    """An nn.Sequential(Linear, ReLU, Linear) applied by hand from its weights."""
    h = F.relu(x @ seq[0].weight.T + seq[0].bias)
    return h @ seq[2].weight.T + seq[2].bias


def reference_intcoop_logits(model, x, names):
    """IntCoOp logits [B, N] from the weights alone (METHOD.md): no method of the model or its prompt learner."""
    p, clip = model.prompt, model.clip
    f, z = _open_clip_image_outputs(clip, x)
    B, D = x.shape[0], p.ctx.shape[-1]
    fn = f / f.norm(dim=-1, keepdim=True)
    if model.config.conditioning == "attention":
        v, _ = plain_mha(p.cond, p.ctx, z)                                       # [B, M, D]
    elif model.config.conditioning == "additive":
        v = p.ctx + _mlp(p.cond.net, fn)[:, None]                                # CoCoOp: one shift for every v_j
    else:
        v = p.ctx.expand(B, -1, -1)
    a = _mlp(p.attr.net, fn).view(B, -1, D)                                      # a(x) [B, K, D]
    sos = clip.token_embedding.weight[model.tokenizer.sot_token_id]
    prefix = torch.cat([sos.expand(B, 1, D), v, a], 1)                           # [SOS] v_1..v_M a(x)
    text = encode_prompts_reference(clip, prefix, names, model.tokenizer, "{}.")  # 77-token prompts
    cos = torch.einsum("be,bne->bn", fn, text / text.norm(dim=-1, keepdim=True))
    return clip.logit_scale.exp() * cos


@pytest.mark.parametrize("conditioning,attr_tokens", [("attention", 1), ("additive", 2), ("none", 1)])
def test_logits_equal_reference_from_scratch(clip_tiny, conditioning, attr_tokens):
    model = intcoop.IntCoOp.from_clip(clip_tiny, conditioning=conditioning, attributes="predicted",
                                      attr_tokens=attr_tokens)
    perturb_prompt(model, seed=7, std=0.1)                   # W_o, meta-net and attribute extractor all active
    if conditioning == "additive":                           # the tiny meta-net has 48 // 16 = 3 hidden units:
        with torch.no_grad():                                # keep one open so that its gradient is not all zero
            model.prompt.cond.net[0].bias[0] = 1.0
    model.double()
    try:
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        fast = model(x, NAMES)
        ref = reference_intcoop_logits(model, x, NAMES)
        assert fast.shape == (3, len(NAMES)) and fast.dtype == torch.float64
        assert_close(fast, ref, torch.float64)
        params = dict(model.prompt.named_parameters())
        w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        g_fast = torch.autograd.grad((fast * w).sum(), list(params.values()))
        g_ref = torch.autograd.grad((ref * w).sum(), list(params.values()))
    finally:
        model.float()                                        # clip_tiny is shared by the session
    for name, a, b in zip(params, g_fast, g_ref):
        assert b.abs().sum() > 0, name                       # every learned part reaches the logits
        assert_close(a, b, torch.float64, msg=name)
