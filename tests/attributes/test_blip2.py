"""intcoop.attributes (blip2, labels_file): answer parsing, the labels file, and labelling real photos with a
tiny random BLIP-2."""
import json
import os

import pytest
from PIL import Image

from intcoop.demo.run import build_tiny_blip2
from intcoop.attributes.blip2 import ModelUnavailableError, label_images, parse_answer
from intcoop.attributes.labels_file import FIELDS, LabelsFileError, read_labels, write_labels

@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    """A tiny random BLIP-2 saved to a folder, rigged to answer "fluffy" at every step."""
    return build_tiny_blip2(tmp_path_factory.mktemp("tiny_blip2"), always="fluffy")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five real photos: four saved as files (PNG / JPEG), one passed as a PIL image."""
    import skimage.data
    from sklearn.datasets import load_sample_images
    d = tmp_path_factory.mktemp("photos")
    arrays = {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(),
              "coffee": skimage.data.coffee(), "china": load_sample_images().images[0]}
    items = []
    for j, (name, arr) in enumerate(arrays.items()):
        path = d / (f"{name}.png" if j % 2 else f"{name}.jpg")
        Image.fromarray(arr).save(path)
        items.append((name, str(path), {"astronaut": "astronaut", "chelsea": "tabby cat", "coffee": "coffee cup",
                                         "china": "pagoda"}[name]))
    items.append(("flower", Image.fromarray(load_sample_images().images[1]), "daisy flower"))
    return items


class CountingLabeler:
    """A user-provided labeler: answers "a {n} thing", records each call, can fail on a given call."""

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = [], fail_on_call

    def __call__(self, images, questions):
        self.calls.append(list(questions))
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("interrupted")
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
        return [f"The {['shiny', 'old', 'wet', 'bright', 'dark'][len(q) % 5]} thing." for q in questions]


def lines(path):
    return [json.loads(s) for s in open(path, encoding="utf-8").read().splitlines()]


@pytest.mark.parametrize("answer, cls, expected", [
    ("fluffy", "cat", "fluffy"),
    ("  Fluffy!! ", "cat", "fluffy"),
    ("a red car", "car", "red"),
    ("The cat is orange.", "tabby cat", "orange"),
    ("tabby", "tabby cat", None),
    ("cats", "cat", None),
    ("it is a photo of the image", "dog", None),
    ("Question: Which one adjective best describes the dog in this image? Answer: happy", "dog", "happy"),
    ("Question: Which one adjective best describes the dog in this image? Answer:", "dog", None),
    ("question: what is it? muddy", "dog", "muddy"),
    ("3d, 42 shiny", "robot", "shiny"),
    ("black-and-white", "zebra", "black"),
    ("", "dog", None),
    (None, "dog", None),
])
def test_parse_answer(answer, cls, expected):
    assert parse_answer(answer, cls) == expected


def test_blip2_labels_real_photos_and_rerun_reuses(tiny_blip2, photos, tmp_path):
    out = tmp_path / "sub" / "labels.jsonl"
    stats = label_images(photos, out, model=tiny_blip2, batch_size=2, progress=False, max_new_tokens=3)
    assert (stats.total, stats.labelled, stats.reused, stats.unusable) == (5, 5, 0, 0)
    assert stats.model == tiny_blip2 and "5 images, 5 newly labelled, 0 reused" in stats.summary()
    recs = lines(out)
    assert [r["id"] for r in recs] == [p[0] for p in photos]
    for r, (_, _, cls) in zip(recs, photos):
        assert tuple(r) == FIELDS and r["class"] == cls and r["model"] == tiny_blip2
        assert r["answer"] == "fluffy fluffy fluffy"  # only the new tokens, not the echoed prompt
        assert r["attribute"] == "fluffy"
    before = out.read_bytes()

    def must_not_run(images, questions):
        raise AssertionError("a rerun must reuse every record")
    again = label_images(photos, out, model="intcoop-test/not-loaded", labeler=must_not_run, progress=False)
    assert (again.total, again.labelled, again.reused, again.unusable) == (5, 0, 5, 0)
    assert out.read_bytes() == before


def test_interrupted_run_resumes_without_recomputing(photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    first = CountingLabeler(fail_on_call=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        label_images(photos, out, labeler=first, batch_size=2, progress=False)
    assert [r["id"] for r in lines(out)] == ["astronaut", "chelsea"]  # the finished batch survived
    second = CountingLabeler()
    stats = label_images(photos, out, labeler=second, batch_size=2, progress=False)
    assert (stats.labelled, stats.reused) == (3, 2) and len(second.calls) == 2
    asked = [q for call in second.calls for q in call]
    assert asked == [f"Question: Which one adjective best describes the {c} in this image? Answer:"
                     for _, _, c in photos[2:]]
    recs = read_labels(out)
    assert sorted(recs) == sorted(p[0] for p in photos) and len(lines(out)) == 5
    assert all(r["model"].startswith("callable:") and r["model"].endswith("CountingLabeler") for r in recs.values())
    assert all(r["attribute"] in {"shiny", "old", "wet", "bright", "dark"} for r in recs.values())


def test_truncated_last_line_is_dropped_and_repaired(photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    label_images(photos[:3], out, labeler=CountingLabeler(), batch_size=3, progress=False)
    full = out.read_bytes()
    cut = full.rstrip(b"\n").rfind(b"\n") + 1 + 25  # 25 bytes into the last record: a crash mid-append
    out.write_bytes(full[:cut])
    with pytest.warns(UserWarning, match="truncated last line"):
        recs = read_labels(out)
    assert sorted(recs) == sorted(p[0] for p in photos[:2])
    labeler = CountingLabeler()
    with pytest.warns(UserWarning, match="truncated"):
        stats = label_images(photos, out, labeler=labeler, batch_size=8, progress=False)
    assert (stats.reused, stats.labelled) == (2, 3) and len(labeler.calls) == 1
    assert [r["id"] for r in lines(out)] == [p[0] for p in photos]  # every line valid JSON, no partial one
    assert os.listdir(tmp_path) == ["labels.jsonl"]  # no temporary file left behind


def test_user_labels_file_validation(tmp_path):
    good = {"id": "x1", "class": "dog", "answer": "happy", "attribute": "happy", "model": "me"}
    p = tmp_path / "user.jsonl"
    write_labels(p, [good, dict(good, id="x2", attribute=None, answer=None, model=None), dict(good, attribute="odd")])
    recs = read_labels(p)
    assert list(recs) == ["x1", "x2"] and recs["x1"]["attribute"] == "odd"  # later lines win
    bad_cases = [
        (json.dumps({k: v for k, v in good.items() if k != "attribute"}), "missing field"),
        (json.dumps(dict(good, id=7)), "'id'"),
        (json.dumps(dict(good, attribute="")), "'attribute'"),
        (json.dumps([1, 2]), "JSON object"),
        ("{not json", "not valid JSON"),
    ]
    for bad, msg in bad_cases:
        p.write_text(json.dumps(good) + "\n" + bad + "\n" + json.dumps(dict(good, id="x3")) + "\n")
        with pytest.raises(LabelsFileError, match=msg) as err:
            read_labels(p)
        assert f"{p}:2" in str(err.value)
    before = p.read_bytes()
    with pytest.raises(LabelsFileError, match="record 1"):
        write_labels(p, [good, dict(good, **{"class": None})])
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["user.jsonl"]  # atomic: old file intact


def test_input_checks(photos, tmp_path):
    out = tmp_path / "labels.jsonl"
    lab = CountingLabeler()
    with pytest.raises(ValueError, match="empty"):
        label_images([], out, labeler=lab)
    with pytest.raises(ValueError, match="duplicate image ids \\['astronaut'\\]"):
        label_images(photos + [photos[0]], out, labeler=lab)
    missing = tmp_path / "nope.jpg"
    notimage = tmp_path / "notes.jpg"
    notimage.write_text("not an image")
    for bad in (missing, notimage):
        with pytest.raises(ValueError, match="unreadable image") as err:
            label_images(photos[:2] + [("bad", str(bad), "cat")], out, labeler=lab, progress=False)
        assert str(bad) in str(err.value)
    wrong = lambda images, questions: ["one answer"]  # noqa: E731
    with pytest.raises(ValueError, match="1 answers for 2 images"):
        label_images(photos[:2], out, labeler=wrong, progress=False)
    assert lab.calls == [] and not out.exists()


def test_offline_error_names_the_model(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        label_images(photos[:1], tmp_path / "l.jsonl", model="intcoop-test/no-such-blip2", progress=False)
    msg = str(err.value)
    assert "intcoop-test/no-such-blip2" in msg and "huggingface-cli download" in msg and "local" in msg
    with pytest.raises(ModelUnavailableError, match="does-not-exist"):
        label_images(photos[:1], tmp_path / "l.jsonl", model=str(tmp_path / "does-not-exist"), progress=False)
    assert not (tmp_path / "l.jsonl").exists()
