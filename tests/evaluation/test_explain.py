"""intcoop.evaluation.explain / report: explain() results against independent computations, the rendered PNG and
HTML, the JSON, attribute_quality on a hand-made case, and the CLI end to end (tiny CLIP; real photos)."""
import base64
import copy
import dataclasses
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import intcoop
from intcoop.evaluation.explain import attribute_quality, explain
from intcoop.evaluation.report import write_report
from intcoop.images import ImageInputError, to_batch
from intcoop.evaluation.report import overlay
from intcoop.testing import assert_close, perturb_prompt
from intcoop.attributes.vocab import decode, token_table

NAMES = ["cat", "astronaut", "coffee", "rocket", "crane", "crane", "flower"]


def _sharpen(model, seed=0):
    """Random prompt parameters, and queries scaled up so that the attention maps are far from uniform."""
    perturb_prompt(model, seed)
    with torch.no_grad():
        if model.config.conditioning == "attention":
            model.prompt.cond.q.weight.mul_(40.0)
    return model.eval()


def _force_word(model, word):
    """A copy of model whose attribute extractor outputs `word`'s token embedding for every image."""
    m = copy.deepcopy(model)
    last = m.prompt.attr.net[-1]
    ids = m.tokenizer.encode(word)
    assert len(ids) == 1, f"{word!r} is not one token"
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(token_table(m.clip)[ids[0]])
    return m


@pytest.fixture(scope="module")
def model(clip_tiny):
    return _sharpen(intcoop.IntCoOp.from_clip(clip_tiny))


@pytest.fixture(scope="module")
def files(photos, tmp_path_factory):
    """Three real photos as files (a sub-folder, so that ids relative to a dataset folder can be matched)."""
    folder = tmp_path_factory.mktemp("photos") / "sub"
    folder.mkdir()
    paths = []
    for name, im in zip(["cat.png", "astronaut.jpg", "coffee.png"], [photos[1], photos[0], photos[2]]):
        im = im.copy()
        im.thumbnail((160, 160))
        im.save(folder / name)
        paths.append(str(folder / name))
    return paths


@pytest.fixture(scope="module")
def results(model, files):
    return explain(files, NAMES, model, labels_by_id={files[0]: "orange", "sub/coffee.png": "brown"}, k=3)


# ------------------------------------------------------------------------------------------------ explain
def test_structure(results, files, model):
    assert len(results) == 3
    for r, path in zip(results, files):
        assert r["image"] == path and r["id"] == path
        assert len(r["top"]) == 3 and len(r["attributes"]) == 3
        assert [t["prob"] for t in r["top"]] == sorted((t["prob"] for t in r["top"]), reverse=True)
        assert all(NAMES[t["index"]] == t["class"] for t in r["top"])
        assert r["attribute_mode"] == "predicted"
        assert len(r["attribute_tokens"]) == 1 and r["attribute_tokens"][0] == r["attributes"]
        att = r["attention"]
        assert att["grid"] == [4, 4] and att["context"] == ["v1", "v2", "v3", "v4"]
        assert np.asarray(att["maps"]).shape == (4, 4, 4) and len(att["cls"]) == 4
    assert [r["blip2"] for r in results] == ["orange", None, "brown"]   # exact id; missing; dataset-relative id
    assert any("no BLIP-2 label" in n for n in results[1]["notes"])
    assert not any("no BLIP-2 label" in n for n in results[0]["notes"] + results[2]["notes"])


def test_probabilities_are_softmax_of_fast_logits(model, files):
    res = explain(files, NAMES, model, k=len(NAMES))
    probs = intcoop.fast_logits(files, NAMES, model).softmax(-1)
    for r, p in zip(res, probs):
        got = torch.zeros(len(NAMES))
        got[[t["index"] for t in r["top"]]] = torch.tensor([t["prob"] for t in r["top"]])
        assert sorted(t["index"] for t in r["top"]) == list(range(len(NAMES)))   # both "crane"s, by index
        assert_close(got, p, torch.float32)
        assert math.isclose(sum(t["prob"] for t in r["top"]), 1.0, abs_tol=1e-5)
    # PIL images and a preprocessed tensor give the same numbers; their names are "#i"
    pil = [Image.open(f).convert("RGB") for f in files]
    x = to_batch(files, model.preprocess, (32, 32))
    for other in (explain(pil, NAMES, model, k=len(NAMES)), explain(x, NAMES, model, k=len(NAMES))):
        assert [r["image"] for r in other] == ["#0", "#1", "#2"] and all(r["id"] is None for r in other)
        for a, b in zip(other, res):
            assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
            assert_close(torch.tensor([t["prob"] for t in a["top"]]), torch.tensor([t["prob"] for t in b["top"]]))


def test_words_come_from_the_vocabulary(results, model, files):
    enc = model.tokenizer.encoder
    x = to_batch(files, model.preprocess, (32, 32))
    with torch.no_grad():
        pred = model.prompt.attributes(model.image_features(x)[0])[:, 0]
    expected = decode(pred, model.clip, model.tokenizer, 3)
    for r, exp in zip(results, expected):
        words = [w["word"] for w in r["attributes"]]
        assert all(w + "</w>" in enc and w.isalpha() for w in words)
        assert words == [w for w, _ in exp]
        cos = [w["cos"] for w in r["attributes"]]
        assert cos == sorted(cos, reverse=True) and all(-1 <= c <= 1 for c in cos)
        w0 = enc[words[0] + "</w>"]
        assert math.isclose(cos[0], F.cosine_similarity(pred[results.index(r)], token_table(model.clip)[w0], 0),
                            rel_tol=1e-5)


def test_forced_prediction_decodes_to_its_word(model, files):
    for word in ("green", "fluffy"):
        res = explain(files, NAMES, _force_word(model, word), k=5)
        for r in res:
            assert r["attributes"][0]["word"] == word
            assert math.isclose(r["attributes"][0]["cos"], 1.0, abs_tol=1e-5)
            assert r["attributes"][1]["cos"] < 0.999


def test_attention_maps_match_plain_multi_head_attention(results, model, files):
    """Independent float64 computation: per head softmax(q k^T / sqrt(Dh)) over the L = 1 + 16 tokens, heads
    averaged, class token first, patches row-major on the 4x4 grid."""
    cond = model.prompt.cond
    H, Dh = cond.heads, cond.head_dim
    with torch.no_grad():
        _, z = model.image_features(to_batch(files, model.preprocess, (32, 32)))
        ctx = model.prompt.ctx.double()
        q = F.linear(ctx, cond.q.weight.double(), cond.q.bias.double()).view(-1, H, Dh)
        k = (z.double() @ cond.k.weight.double().T).view(z.shape[0], z.shape[1], H, Dh)
        w = torch.einsum("mhd,blhd->bmhl", q, k).mul(Dh ** -0.5).softmax(-1).mean(2)     # [B, M, L]
    assert z.shape[1] == 17
    for b, r in enumerate(results):
        maps, cls = torch.tensor(r["attention"]["maps"]), torch.tensor(r["attention"]["cls"])
        assert_close(maps, w[b, :, 1:].reshape(4, 4, 4), torch.float32)
        assert_close(cls, w[b, :, 0], torch.float32)
        assert_close(maps.flatten(1).sum(1) + cls, torch.ones(4, dtype=torch.float64), torch.float32)
        assert maps.max() > 2 * maps.min()                                                 # not uniform


def test_models_without_attributes_or_attention(clip_tiny, files, tmp_path):
    plain = _sharpen(intcoop.IntCoOp.from_clip(clip_tiny, conditioning="additive", attributes="off"))
    res = explain(files[:2], NAMES, plain, k=2)
    for r in res:
        assert r["attributes"] is None and r["attribute_tokens"] is None and r["attention"] is None
        assert any("no attribute slot" in n for n in r["notes"])
        assert any("no attention maps" in n and "additive" in n for n in r["notes"])
    paths = write_report(res, files[:2], tmp_path)
    assert Image.open(paths["png"]).size[0] > 100
    assert "no attribute slot" in paths["html"].read_text()


def test_inputs_are_checked_before_work(model, files, monkeypatch):
    m = copy.deepcopy(model)
    monkeypatch.setattr(m, "image_features", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="empty"):
        explain(files, [], m)
    with pytest.raises(ImageInputError, match="missing.png"):
        explain(files + ["/nonexistent/missing.png"], NAMES, m)
    with pytest.raises(ValueError, match="2 ids for 3 images"):
        explain(files, NAMES, m, ids=["a", "b"])
    with pytest.raises(ValueError, match="ids="):
        explain([Image.open(files[0])], NAMES, m, labels_by_id={"a": "red"})
    with pytest.raises(ValueError, match="k must be"):
        explain(files, NAMES, m, k=0)
    m.set_attributes("oracle")
    with pytest.raises(ValueError, match="oracle"):
        explain(files, NAMES, m)


def test_oracle_and_records_and_ids(model, files):
    m = copy.deepcopy(model)
    m.set_attributes("oracle")
    records = {"x1": {"id": "x1", "class": "cat", "answer": "Red.", "attribute": "red", "model": "t"}, "x2": None}
    res = explain(files[:2], NAMES, m, labels_by_id=records, ids=["x1", "x2"])
    assert [r["id"] for r in res] == ["x1", "x2"] and [r["blip2"] for r in res] == ["red", None]
    assert any("oracle" in n for n in res[0]["notes"])


# ------------------------------------------------------------------------------------------------ reports
def test_overlay_puts_heat_where_attention_is():
    picture = np.full((64, 64, 3), 128, dtype=np.uint8)
    m = np.zeros((4, 4), dtype=np.float32)
    m[0, 0] = 1.0                                           # top-left patch
    out = overlay(picture, m).astype(int)
    assert np.abs(out[:8, :8] - 128).sum(-1).min() > 30     # coloured where attended
    assert (out[40:, 40:] == 128).all()                     # untouched far from it (the map's minimum)
    assert overlay(picture, m.T).tolist() == overlay(picture, m).tolist()   # symmetric case: same
    m2 = np.zeros((4, 4), dtype=np.float32)
    m2[0, 3] = 1.0                                          # top-right: heat moves right, not down
    out2 = overlay(picture, m2).astype(int)
    assert (out2[:8, :8] == 128).all() and np.abs(out2[:8, -8:] - 128).sum(-1).min() > 30


def test_png_renders(results, files, tmp_path):
    paths = write_report(results, files, tmp_path / "a")
    im = np.asarray(Image.open(paths["png"]).convert("RGB")).astype(int)
    one = np.asarray(Image.open(write_report(results[:1], files[:1], tmp_path / "b")["png"]).convert("RGB"))
    two = np.asarray(Image.open(write_report(results[:2], files[:2], tmp_path / "d")["png"]).convert("RGB"))
    row = two.shape[0] - one.shape[0]
    assert im.shape[1] == one.shape[1] and abs(im.shape[0] - two.shape[0] - row) <= 1 and row > 200  # a row each
    assert im.shape[1] > 2 * one.shape[0] > 300                                         # image + 4 maps + text
    assert im.std() > 20 and len(np.unique(im.reshape(-1, 3), axis=0)) > 1000            # not blank
    moved = copy.deepcopy(results)
    for r in moved:
        r["attention"]["maps"] = [np.rot90(np.asarray(m)).tolist() for m in r["attention"]["maps"]]
    im2 = np.asarray(Image.open(write_report(moved, files, tmp_path / "c")["png"]).convert("RGB")).astype(int)
    assert im2.shape == im.shape and (np.abs(im2 - im).sum(-1) > 30).sum() > 5000         # the heat maps show


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.text, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_self_contained_and_readable(results, files, tmp_path):
    paths = write_report(results, files, tmp_path)
    page = _Page()
    page.feed(paths["html"].read_text(encoding="utf-8"))
    page.close()
    assert len(page.imgs) == 3 * (1 + 4) and "script" not in page.tags and "link" not in page.tags
    for img in page.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        pic = Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix):], validate=True)))
        pic.load()
        assert pic.size == (224, 224) and pic.format == "PNG"
    text = " ".join(page.text)
    for r in results:
        assert r["image"] in text and r["top"][0]["class"] in text and r["attributes"][0]["word"] in text
    assert "orange" in text and "brown" in text


def test_json_round_trips(results, files, tmp_path):
    paths = write_report(results, files, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["format"] == "intcoop-explain-v1" and doc["results"] == results
    with pytest.raises(ValueError, match="2 results for 3 images"):
        write_report(results[:2], files, tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_html_renders_in_chromium(results, files, tmp_path):
    paths = write_report(results, files, tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,900", paths["html"].as_uri()],
                   check=True, capture_output=True, timeout=120)
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[:2] == (900, 1200)
    assert im.std() > 20 and len(np.unique(im.reshape(-1, 3), axis=0)) > 1000   # text and pictures drawn


# ---------------------------------------------------------------------------------------- attribute quality
def test_attribute_quality_hand_made(model, files, tmp_path):
    from intcoop.data import Item

    m = _force_word(model, "green")
    table = token_table(m.clip).detach()
    second = decode(table[m.tokenizer.encode("green")], m.clip, m.tokenizer, 2)[0][1][0]   # 2nd nearest word
    assert len(m.tokenizer.encode(second)) == 1
    items = [Item(files[0], 0, "cat", "a"), Item(files[1], 0, "cat", "b"), Item(files[2], 1, "coffee", "c"),
             Item(files[0], 1, "coffee", "d"), Item(files[1], 1, "coffee", "e")]
    labels = {"a": "green", "b": "Green", "c": second, "d": None}                  # "e": absent
    res = attribute_quality(m, items, labels, batch_size=2, out_dir=tmp_path)
    c = float(F.cosine_similarity(table[m.tokenizer.encode("green")[0]], table[m.tokenizer.encode(second)[0]], 0))
    cat, coffee, allr = res["per_class"]["cat"], res["per_class"]["coffee"], res["overall"]
    assert (cat["n"], cat["unlabelled"], cat["top1"], cat["top5"]) == (2, 0, 1.0, 1.0)
    assert math.isclose(cat["mean_cos"], 1.0, abs_tol=1e-5)
    assert (coffee["n"], coffee["unlabelled"], coffee["top1"], coffee["top5"]) == (1, 2, 0.0, 1.0)
    assert math.isclose(coffee["mean_cos"], c, abs_tol=1e-5)
    assert (allr["n"], allr["unlabelled"], allr["top5"]) == (3, 2, 1.0) and math.isclose(allr["top1"], 2 / 3)
    assert math.isclose(allr["mean_cos"], (2 + c) / 3, abs_tol=1e-5)
    assert [r["class"] for r in res["rows"]] == ["cat", "coffee", "all"]
    csv_path, md_path = res["files"]
    assert csv_path.read_text().splitlines()[0] == "class,n,unlabelled,top1,top5,mean_cos"
    assert "| all | 3 | 2 | 0.67 | 1.00 |" in md_path.read_text()
    with pytest.raises(ValueError, match="none of the 5 images"):
        attribute_quality(m, items, {"zz": "red"})
    plain = intcoop.IntCoOp.from_clip(m.clip, attributes="off")
    with pytest.raises(ValueError, match="no attribute slot"):
        attribute_quality(plain, items, labels)


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def checkpoint(clip_b16, tmp_path_factory):
    """A checkpoint of an IntCoOp on ViT-B-16 (random weights: pretrained=None) that load_trained can rebuild."""
    from intcoop.train.checkpoint import save_checkpoint
    from intcoop.config import RunConfig

    m = _sharpen(intcoop.IntCoOp.from_clip(clip_b16))
    cfg = RunConfig(model=dataclasses.replace(m.config, clip="ViT-B-16", pretrained=None))
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, {"config": dataclasses.asdict(cfg), "prompt": m.learnable_state_dict()})
    return path


def test_cli_explain_end_to_end(checkpoint, files, tmp_path, capsys):
    from intcoop.cli import main
    from intcoop.attributes.labels_file import write_labels

    labels = tmp_path / "labels.jsonl"
    write_labels(labels, [{"id": "sub/cat.png", "class": "cat", "answer": "Orange", "attribute": "orange",
                           "model": "t"}])
    out = tmp_path / "report"
    rc = main(["explain", *files[:2], "--checkpoint", str(checkpoint), "--classes", "cat,astronaut,coffee",
               "--labels", str(labels), "--out", str(out), "--top", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"report: {out / 'report.html'}" in text
    assert f"{files[0]}: " in text and f"{files[1]}: " in text and "BLIP-2: orange" in text
    doc = json.loads((out / "report.json").read_text())["results"]
    assert doc[0]["attention"]["grid"] == [14, 14] and len(doc[0]["top"]) == 2 and doc[0]["blip2"] == "orange"
    assert Image.open(out / "report.png").size[0] > 1000
    rc = main(["explain", files[0], "--checkpoint", str(checkpoint), "--classes", "cat", "--out", str(out),
               "--top", "0"])
    assert rc == 2 and "--top must be" in capsys.readouterr().err


def test_cli_explain_zero_shot_says_no_attributes(clip_tiny, files, tmp_path, capsys):
    """Without --checkpoint: CLIP zero-shot (no attribute slot) on --clip / --pretrained, offline."""
    from intcoop.cli import main

    assert main(["explain", files[0], "--classes", "cat,dog", "--out", str(tmp_path), "--clip", "intcoop-tiny",
                 "--pretrained", "none"]) == 0
    text = capsys.readouterr().out
    assert "attribute: none (no attribute slot)" in text and "note: no attribute words" in text
    assert "note: the CLIP (intcoop-tiny) has random weights" in text


def _with_maps(results, maps):
    out = copy.deepcopy(results[:len(maps)])
    for r, m in zip(out, maps):
        r["attention"]["maps"] = [m.tolist()] * len(r["attention"]["maps"])
    return out


def test_report_draws_attention_on_one_scale_relative_to_uniform(results, files):
    from intcoop.evaluation.report import _pictures, attention_scale, display_images, legend

    gh, gw = results[0]["attention"]["grid"]
    L = gh * gw + 1
    uniform = np.full((gh, gw), 1.0 / L)
    picture = display_images(files[:1])[0]
    flat = _with_maps(results, [uniform])
    assert attention_scale(flat) == 2.0                                # nothing above uniform: the floor
    for caption, pic in _pictures(flat[0], picture, attention_scale(flat))[1:]:
        assert caption.startswith("v") and "max 1.00x uniform" in caption
        assert np.array_equal(pic, picture)                             # uniform attention: no colour at all
    assert f"1/L = 1/{L}" in legend(flat) and "full colour at 2.00x" in legend(flat)
    mild = uniform.copy()
    mild[0, 0] *= 1.5                                                   # 1.5x uniform at one patch
    sharp = uniform.copy()
    sharp[0, 0] *= 8.0
    both = _with_maps(results, [mild, sharp])
    top = attention_scale(both)
    assert top == pytest.approx(8.0, rel=1e-5)
    alone = _pictures(_with_maps(results, [mild])[0], picture, attention_scale(_with_maps(results, [mild])))[1][1]
    shared = _pictures(both[0], picture, top)[1][1]
    change = lambda pic: np.abs(pic.astype(int) - picture.astype(int)).sum()
    assert 0 < change(shared) < change(alone)                           # the mild map looks mild beside the sharp


def test_cli_attributes(checkpoint, photos, tmp_path, capsys):
    from intcoop.cli import main
    from intcoop.attributes.labels_file import write_labels

    root = tmp_path / "data"
    recs = []
    for cls, ims in (("cat", photos[1:2]), ("rocket", photos[3:5])):
        (root / "test" / cls).mkdir(parents=True)
        for j, im in enumerate(ims):
            im.resize((64, 64)).save(root / "test" / cls / f"{j}.png")
            recs.append({"id": f"test/{cls}/{j}.png", "class": cls, "answer": "x", "attribute": "red", "model": "t"})
    write_labels(tmp_path / "labels.jsonl", recs)
    rc = main(["attributes", "--checkpoint", str(checkpoint), "--dataset", "imagefolder", "--root", str(root),
               "--labels", str(tmp_path / "labels.jsonl"), "--split", "test", "--out", str(tmp_path / "q")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| cat | 1 | 0 |" in text and "| rocket | 2 | 0 |" in text and "| all | 3 | 0 |" in text
    assert (tmp_path / "q" / "attributes_imagefolder_test.csv").is_file()
