"""intcoop.attributes.vocab on a randomly initialised open_clip ViT-B-16 (real tokenizer, real BPE vocabulary)."""
import math

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed")

from intcoop.attributes.vocab import agreement, attribute_targets, decode, token_table  # noqa: E402


@pytest.fixture(scope="module")
def clip_tok():
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return clip, open_clip.get_tokenizer("ViT-B-16")


def single_id(tok, word):
    ids = tok.encode(word)
    assert ids == [tok.encoder[word + "</w>"]], f"{word!r} is not one whole-word token: {ids}"
    return ids[0]


def test_targets_are_mean_of_bpe_rows(clip_tok):
    clip, tok = clip_tok
    table = token_table(clip).detach().double()
    words = ["green", "xylophonic", None, "", "   ", "Fluffy", "light brown"]
    t = attribute_targets(words, clip, tok)
    assert t.emb.shape == (7, 512) and t.emb.dtype == torch.float32
    assert t.valid.tolist() == [True, True, False, False, False, True, True]
    pieces = tok.encode("xylophonic")
    assert len(pieces) >= 3  # a multi-token word: the mean really averages several rows
    expected = {0: [single_id(tok, "green")], 1: pieces, 5: [single_id(tok, "fluffy")],
                6: [single_id(tok, "light"), single_id(tok, "brown")]}
    for i, ids in expected.items():
        torch.testing.assert_close(t.emb[i].double(), table[ids].mean(0), atol=1e-7, rtol=1e-6)
    assert torch.count_nonzero(t.emb[2:5]) == 0
    assert not torch.allclose(t.emb[1], table[pieces[0]].float())


def test_decode_own_token_first_with_cosine_one(clip_tok):
    clip, tok = clip_tok
    table = token_table(clip).detach()
    words = ["red", "dog", "astronaut", "wooden", "striped"]
    ids = [single_id(tok, w) for w in words]
    emb = table[ids] * torch.tensor([1.0, 2.5, 0.3, 7.0, 1.0])[:, None]  # cosine ignores scale
    for words_only in (True, False):
        out = decode(emb, clip, tok, k=5, words_only=words_only)
        assert len(out) == 5 and all(len(r) == 5 for r in out)
        for w, row in zip(words, out):
            assert row[0][0] == w
            assert math.isclose(row[0][1], 1.0, abs_tol=1e-5)
            cos = [c for _, c in row]
            assert cos == sorted(cos, reverse=True) and cos[1] < 0.5  # random table: others are far


def test_decode_cosines_match_reference_and_words_only_filters(clip_tok):
    clip, tok = clip_tok
    table = token_table(clip).detach().double()
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(3, 512, generator=g)
    out = decode(emb, clip, tok, k=7, words_only=True)
    ref = torch.nn.functional.normalize(emb.double(), dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    for b, row in enumerate(out):
        for w, c in row:
            j = tok.encoder[w + "</w>"]  # KeyError if a non-whole-word token slipped through
            assert w.isascii() and w.isalpha()
            assert math.isclose(c, float(ref[b, j]), abs_tol=1e-5)
    # unfiltered: the k best of the whole table, including BPE pieces such as "xy"
    piece = tok.encode("xylophonic")[0]
    assert not tok.decoder[piece].endswith("</w>")
    top = decode(table[[piece]].float(), clip, tok, k=3, words_only=False)[0]
    assert top[0][0] == tok.decoder[piece] and math.isclose(top[0][1], 1.0, abs_tol=1e-5)
    assert tok.decoder[piece] not in [w for w, _ in decode(table[[piece]].float(), clip, tok, k=3)[0]]
    with pytest.raises(ValueError, match="emb"):
        decode(emb[0], clip, tok)


def test_agreement_hand_made(clip_tok):
    clip, tok = clip_tok
    table = token_table(clip).detach()
    e = {w: table[single_id(tok, w)] for w in ("red", "dog", "cat", "blue")}
    pred = torch.stack([e["red"],                      # label red: top-1 hit
                        e["dog"] + 0.8 * e["cat"],      # label cat: second word -> top-5 hit only
                        e["dog"],                       # label blue: miss
                        e["blue"]])                     # unlabelled: excluded
    labels = ["red", "cat", "Blue", None]
    out = agreement(pred, labels, clip, tok, ks=(1, 5))
    assert out["n"] == 3 and out["unlabelled"] == 1
    assert out["top1"] == pytest.approx(1 / 3) and out["top5"] == pytest.approx(2 / 3)
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))  # noqa: E731
    expected = (1.0 + cos(pred[1], e["cat"]) + cos(e["dog"], e["blue"])) / 3
    assert out["mean_cos"] == pytest.approx(expected, abs=1e-5)
    empty = agreement(pred[:1], [None], clip, tok)
    assert empty["n"] == 0 and math.isnan(empty["top1"]) and math.isnan(empty["mean_cos"])


def test_decoded_words_are_english_words_never_bpe_fragments():
    """Word-final BPE pieces of longer words ("omusic</w>", "tok</w>") are in CLIP's vocabulary but are not words:
    decode never shows them, while real words ("red", "furry") stay decodable."""
    import open_clip

    from intcoop.attributes.vocab import _vocab, decode

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    tok = open_clip.SimpleTokenizer()
    table = clip.token_embedding.weight.detach()
    mask, words = _vocab(tok, table.shape[0])
    ids = {w: tok.encoder[w + "</w>"] for w in ("omusic", "tok", "red", "furry")}
    assert not mask[ids["omusic"]] and not mask[ids["tok"]]
    assert mask[ids["red"]] and mask[ids["furry"]]
    # the embedding of a fragment itself decodes to real words only
    out = decode(table[[ids["omusic"], ids["red"]]], clip, tok, k=5)
    assert all(w not in ("omusic", "tok") for w, _ in out[0]) and out[1][0][0] == "red"
