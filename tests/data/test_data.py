"""Tests of intcoop.data: readers of every CoOp layout and ImageFolder trees (on real images), the few-shot
sampler and its cache, the base/novel split, templates, transforms and the reproducible loader.

Images are real: Fashion-MNIST from Debian's dataset-fashion-mnist (via `build_demo_dataset`) and the sample
photographs of scikit-image / scikit-learn. Layouts are written twice: by `write_coop_layout` (every dataset,
round trip checked against the source images' bytes) and by hand, literally, for the main ones.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from intcoop.data import (CLIP_MEAN, CLIP_STD, DATASETS, DatasetLayoutError, FewShotCacheError, ImageDataset,
                          Item, Splits, TEMPLATES, clip_transforms, fewshot, fewshot_splits,
                          load_dataset, make_loader, subsample_classes)
from intcoop.data import protocols
from intcoop.images import ImageInputError, to_batch
from intcoop.demo import data as demo
from intcoop.demo.data import build_demo_dataset, photo, write_coop_layout
from intcoop.demo.layouts import wnid
from intcoop.data.imagenet_subsets import IMAGENET_A_IN1K, IMAGENET_R_IN1K

N_CLASSES, PER_CLASS, VAL_PER_CLASS, TEST_PER_CLASS = 5, 6, 2, 3


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "fmnist", classes=N_CLASSES, per_class=PER_CLASS,
                              val_per_class=VAL_PER_CLASS, test_per_class=TEST_PER_CLASS, size=48, seed=0)


@pytest.fixture(scope="session")
def demo_splits(demo_root) -> Splits:
    return load_dataset("imagefolder", demo_root)


def digest(path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def signature(items) -> Counter:
    """Multiset of (image bytes, label, class name): what a reader must get right, whatever the paths."""
    return Counter((digest(it.path), it.label, it.classname) for it in items)


def save_photo(path: Path, name: str = "cat", size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(name, size).save(path)
    return path


# ----------------------------------------------------------------------------------------------- demo data

def test_demo_dataset_writes_real_images(demo_root, demo_splits):
    assert demo_splits.classnames == ["coat", "dress", "pullover", "t-shirt", "trouser"]
    for split, n in (("train", PER_CLASS), ("val", VAL_PER_CLASS), ("test", TEST_PER_CLASS)):
        items = getattr(demo_splits, split)
        assert Counter(it.label for it in items) == {c: n for c in range(N_CLASSES)}
    ims = [np.asarray(Image.open(it.path)) for it in demo_splits.train]
    assert all(im.shape == (48, 48, 3) and im.dtype == np.uint8 for im in ims)
    assert min(im.std() for im in ims) > 20          # real pictures, not flat colour
    assert len({im.tobytes() for im in ims}) == len(ims)
    all_ids = [digest(it.path) for s in ("train", "val", "test") for it in getattr(demo_splits, s)]
    assert len(set(all_ids)) == len(all_ids)         # train / val / test are different images
    assert "Fashion-MNIST" in (demo_root / "SOURCE.txt").read_text()


def test_demo_dataset_is_seeded(tmp_path):
    kw = dict(classes=["bag", "sneaker"], per_class=2, val_per_class=1, test_per_class=1, size=32)
    a, b, c = (load_dataset("imagefolder", build_demo_dataset(tmp_path / n, seed=s, **kw))
               for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert a.classnames == ["bag", "sneaker"]
    assert [digest(i.path) for i in a.train] == [digest(i.path) for i in b.train]
    assert [digest(i.path) for i in a.train] != [digest(i.path) for i in c.train]
    with pytest.raises(FileExistsError, match="not empty"):
        build_demo_dataset(tmp_path / "a", **kw)
    build_demo_dataset(tmp_path / "a", overwrite=True, **kw)


def test_demo_photos_source(tmp_path):
    s = load_dataset("imagefolder", build_demo_dataset(tmp_path / "p", source="photos", classes=["cat", "rocket"],
                                                       per_class=2, val_per_class=1, test_per_class=1, size=32))
    assert s.classnames == ["cat", "rocket"] and len(s.train) == 4
    assert len({digest(it.path) for it in s.train}) == 4


def test_demo_missing_source_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("INTCOOP_FASHION_MNIST_DIR", str(tmp_path))
    demo._fashion_mnist.cache_clear()
    try:
        with pytest.raises(demo.DemoSourceError, match="apt-get install -y dataset-fashion-mnist") as e:
            build_demo_dataset(tmp_path / "out", classes=1, per_class=1)
        assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(e.value)
    finally:
        demo._fashion_mnist.cache_clear()
    with pytest.raises(ValueError, match="unknown demo source"):
        build_demo_dataset(tmp_path / "x", source="nope")


# ----------------------------------------------------------------------------------------------- readers

LAYOUT_NAMES = sorted(n for n in DATASETS if n != "imagefolder")
SUBSET = [1, 3, 4]  # the classes written for ImageNet-A / -R


@pytest.mark.parametrize("name", LAYOUT_NAMES + ["imagefolder"])
def test_reader_round_trip(name, demo_splits, tmp_path):
    folder = write_coop_layout(name, demo_splits, tmp_path, classes=SUBSET if name in ("imagenet_a", "imagenet_r")
                               else None)
    got = load_dataset(name, tmp_path)
    src = demo_splits
    assert got.name == name and Path(got.root) == folder.absolute() and got.template == TEMPLATES[name]
    if name in ("imagenet_a", "imagenet_r"):
        assert got.classnames == [src.classnames[i] for i in SUBSET]
        assert got.class_keys == [wnid(i) for i in SUBSET]
        want = Counter((digest(i.path), SUBSET.index(i.label), i.classname) for i in src.test if i.label in SUBSET)
        assert signature(got.test) == want and got.train == [] and got.val == []
    elif name in ("imagenetv2", "imagenet_sketch"):
        assert got.classnames == src.classnames and got.train == [] and got.val == []
        assert signature(got.test) == signature(src.test)
    elif name == "imagenet":
        assert got.class_keys == [wnid(i) for i in range(N_CLASSES)]
        assert signature(got.train) == signature(src.train)
        assert signature(got.test) == signature(src.test) and got.val == got.test
    else:
        assert got.classnames == src.classnames
        for split in ("train", "val", "test"):
            assert signature(getattr(got, split)) == signature(getattr(src, split)), split
    for it in got.train + got.test:
        assert Path(it.path).is_file() and (folder / it.id).resolve() == Path(it.path).resolve()
    again = load_dataset(name, folder)  # the dataset folder itself is accepted as root
    assert again.test == got.test and again.train == got.train


def test_oxford_pets_literal(tmp_path):
    d = tmp_path / "oxford_pets"
    split = {"train": [["Abyssinian_1.jpg", 0, "abyssinian"], ["american_bulldog_10.jpg", 1, "american_bulldog"],
                       ["american_bulldog_11.jpg", 1, "american_bulldog"]],
             "val": [["Abyssinian_2.jpg", 0, "abyssinian"]],
             "test": [["american_bulldog_12.jpg", "1", "american_bulldog"]]}
    for s in split.values():
        for rel, _, _ in s:
            save_photo(d / "images" / rel)
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    got = load_dataset("oxford_pets", tmp_path)
    assert got.classnames == ["abyssinian", "american bulldog"]
    assert got.class_keys == ["abyssinian", "american_bulldog"]
    assert [(it.id, it.label, it.classname) for it in got.train] == [
        ("images/Abyssinian_1.jpg", 0, "abyssinian"), ("images/american_bulldog_10.jpg", 1, "american bulldog"),
        ("images/american_bulldog_11.jpg", 1, "american bulldog")]
    assert got.test[0].label == 1 and got.test[0].path == str((d / "images/american_bulldog_12.jpg").absolute())
    assert got.prompts() == ["a photo of a abyssinian, a type of pet.", "a photo of a american bulldog, a type of pet."]


def test_dtd_eurosat_ucf101_literal(tmp_path):
    cases = {
        "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
                [["banded/banded_0002.jpg", 0, "banded"], ["bubbly/bubbly_0038.jpg", 1, "bubbly"]],
                ["banded", "bubbly"], "{} texture."),
        "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                    [["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"], ["Forest/Forest_7.jpg", 1, "Forest"]],
                    ["Annual Crop Land", "Forest"], "a centered satellite photo of {}."),
        "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                   [["Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg", 0, "Apply_Eye_Makeup"],
                    ["Archery/v_Archery_g01_c02.jpg", 1, "Archery"]],
                   ["Apply Eye Makeup", "Archery"], "a photo of a person doing {}."),
    }
    for name, (folder, images, split_file, entries, names, template) in cases.items():
        for k, (rel, _, _) in enumerate(entries):
            save_photo(tmp_path / folder / images / rel, ["brick", "gravel"][k])
        (tmp_path / folder / split_file).write_text(json.dumps({"train": entries, "val": [], "test": entries[::-1]}))
        got = load_dataset(name, tmp_path)
        assert got.classnames == names and got.template == template, name
        assert [it.label for it in got.train] == [0, 1] and [it.label for it in got.test] == [1, 0]
        assert got.train[0].id == f"{images}/{entries[0][0]}"


def test_duplicate_class_names_are_legal(tmp_path):
    entries = [["a.jpg", 0, "crane"], ["b.jpg", 1, "crane"], ["c.jpg", 2, "goldfish"]]
    for rel, _, _ in entries:
        save_photo(tmp_path / "caltech-101" / "101_ObjectCategories" / rel)
    (tmp_path / "caltech-101" / "split_zhou_Caltech101.json").write_text(
        json.dumps({"train": entries, "val": [], "test": []}))
    got = load_dataset("caltech101", tmp_path)
    assert got.classnames == ["crane", "crane", "goldfish"] and [i.label for i in got.train] == [0, 1, 2]


def test_imagenet_literal(tmp_path):
    d = tmp_path / "imagenet"
    d.mkdir()
    (d / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n\nn01484850 great white shark\n")
    save_photo(d / "images/train/n01443537/n01443537_1.JPEG", "coffee")
    save_photo(d / "images/train/n01484850/n01484850_5.JPEG", "rocket")
    save_photo(d / "images/train/n01484850/n01484850_2.JPEG", "cat")
    save_photo(d / "images/val/n01440764/ILSVRC2012_val_00000293.JPEG", "moon")
    got = load_dataset("imagenet", tmp_path)
    assert got.classnames == ["tench", "goldfish", "great white shark"]
    assert got.class_keys == ["n01440764", "n01443537", "n01484850"]
    assert [(it.id, it.label) for it in got.train] == [
        ("images/train/n01443537/n01443537_1.JPEG", 1), ("images/train/n01484850/n01484850_2.JPEG", 2),
        ("images/train/n01484850/n01484850_5.JPEG", 2)]
    assert [(it.label, it.classname) for it in got.test] == [(0, "tench")] and got.val == got.test
    save_photo(d / "images/val/n99999999/x.JPEG")
    with pytest.raises(DatasetLayoutError, match="n99999999"):
        load_dataset("imagenet", tmp_path)


def test_imagenetv2_literal(tmp_path):
    d = tmp_path / "imagenetv2"
    d.mkdir()
    (d / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    save_photo(d / "imagenetv2-matched-frequency-format-val/2/7e1d.jpeg")
    save_photo(d / "imagenetv2-matched-frequency-format-val/0/a1b2.jpeg")
    got = load_dataset("imagenetv2", d)
    assert [(it.label, it.classname) for it in got.test] == [(0, "tench"), (2, "great white shark")]
    assert got.num_classes == 3


@pytest.mark.parametrize("name,folder,images", [("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                                                ("imagenet_r", "imagenet-rendition", "imagenet-r"),
                                                ("imagenet_sketch", "imagenet-sketch", "images")])
def test_imagenet_subsets_literal(name, folder, images, tmp_path):
    d = tmp_path / folder
    d.mkdir()
    table = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
             ("n01491361", "tiger shark"), ("n01494475", "hammerhead shark")]
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in table))
    save_photo(d / images / "n01494475" / "0.jpg", "grass")
    save_photo(d / images / "n01484850" / "1.jpg", "coins")
    save_photo(d / images / "n01484850" / "0.jpg", "coins")
    (d / images / "README.txt").write_text("not a class\n")
    got = load_dataset(name, tmp_path)
    assert got.classnames == ["great white shark", "hammerhead shark"]
    assert got.class_keys == ["n01484850", "n01494475"]
    assert [(it.label, Path(it.path).name) for it in got.test] == [(0, "0.jpg"), (0, "1.jpg"), (1, "0.jpg")]


@pytest.mark.parametrize("name,folder,images,subset", [("imagenet_a", "imagenet-adversarial", "imagenet-a",
                                                        IMAGENET_A_IN1K),
                                                       ("imagenet_r", "imagenet-rendition", "imagenet-r",
                                                        IMAGENET_R_IN1K)])
def test_imagenet_a_r_reject_classes_outside_their_200(name, folder, images, subset, tmp_path):
    assert len(subset) == 200 and list(subset) == sorted(set(subset)) and subset[-1] < 1000
    d = tmp_path / folder
    d.mkdir()
    (d / "classnames.txt").write_text("".join(f"{wnid(i)} class {i}\n" for i in range(1000)))
    inside = subset[0]
    outside = next(i for i in range(1000) if i not in subset)
    save_photo(d / images / wnid(inside) / "0.jpg")
    assert load_dataset(name, tmp_path).classnames == [f"class {inside}"]
    save_photo(d / images / wnid(outside) / "0.jpg")
    with pytest.raises(DatasetLayoutError, match=f"{wnid(outside)} is not one of the 200 classes"):
        load_dataset(name, tmp_path)


def test_imagefolder_flat_tree_is_split_deterministically(tmp_path):
    for k in range(10):
        save_photo(tmp_path / "sea_lion" / f"{k}.jpg", "moon")
        if k < 3:
            save_photo(tmp_path / "tabby" / f"{k}.png", "cat")
    save_photo(tmp_path / "zebra" / "only.jpg", "grass")
    (tmp_path / "sea_lion" / "notes.txt").write_text("not an image")
    (tmp_path / "tabby" / ".hidden.jpg").write_text("hidden")
    got = load_dataset("imagefolder", tmp_path)
    assert got.classnames == ["sea lion", "tabby", "zebra"] and got.class_keys == ["sea_lion", "tabby", "zebra"]
    per = {s: Counter(it.label for it in getattr(got, s)) for s in ("train", "val", "test")}
    assert per["train"] == {0: 5, 1: 2, 2: 1} and per["val"] == {0: 2, 1: 1} and per["test"] == {0: 3}
    ids = [it.id for s in ("train", "val", "test") for it in getattr(got, s)]
    assert sorted(ids) == sorted([f"sea_lion/{k}.jpg" for k in range(10)] + [f"tabby/{k}.png" for k in range(3)]
                                 + ["zebra/only.jpg"])
    assert load_dataset("imagefolder", tmp_path) == got


def test_imagefolder_with_split_folders_and_missing_class(tmp_path):
    save_photo(tmp_path / "train" / "b_cls" / "x.jpg")
    save_photo(tmp_path / "test" / "a_cls" / "y.jpg")
    got = load_dataset("imagefolder", tmp_path)
    assert got.classnames == ["a cls", "b cls"] and got.val == []
    assert [(it.label, it.id) for it in got.train] == [(1, "train/b_cls/x.jpg")]
    assert [(it.label, it.id) for it in got.test] == [(0, "test/a_cls/y.jpg")]


# ----------------------------------------------------------------------------------------------- reader errors

def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist") as e:
        load_dataset("dtd", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_missing_split_file_names_file_and_layout(tmp_path):
    save_photo(tmp_path / "oxford_pets" / "images" / "Abyssinian_1.jpg")
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("oxford_pets", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json") in msg and "expected layout" in msg


def test_missing_image_folder_named(tmp_path):
    (tmp_path / "eurosat").mkdir()
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text('{"train": [], "val": [], "test": []}')
    with pytest.raises(DatasetLayoutError, match="2750"):
        load_dataset("eurosat", tmp_path)


@pytest.mark.parametrize("doc,match", [
    ('{"train": [["a.jpg", 0]], "val": [], "test": []}', r"train\[0\]"),
    ('{"train": [], "val": []}', "must hold lists"),
    ('{"train": [["a.jpg", "x", "c"]], "val": [], "test": []}', r"train\[0\]"),
    ('{"train": [["a.jpg", 0, "c"], ["b.jpg", 0, "d"]], "val": [], "test": []}', "named both"),
    ('{"train": [["a.jpg", 1, "c"]], "val": [], "test": []}', "missing"),
    ('{"train": [', "not valid JSON"),
])
def test_malformed_split_file(doc, match, tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(doc)
    with pytest.raises(DatasetLayoutError, match=match) as e:
        load_dataset("dtd", tmp_path)
    assert "split_zhou_DescribableTextures.json" in str(e.value)


def test_fgvc_unknown_variant_names_file_and_line(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    save_photo(d / "images" / "1025794.jpg")
    (d / "variants.txt").write_text("707-320\nA300B4\n")
    (d / "images_variant_train.txt").write_text("1025794 707-320\n1025795 Boeing 999\n")
    (d / "images_variant_val.txt").write_text("")
    (d / "images_variant_test.txt").write_text("")
    with pytest.raises(DatasetLayoutError, match=r"images_variant_train.txt:2: variant 'Boeing 999'"):
        load_dataset("fgvc_aircraft", tmp_path)
    (d / "images_variant_train.txt").write_text("1025794 A300B4\n")
    got = load_dataset("fgvc_aircraft", tmp_path)
    assert got.classnames == ["707-320", "A300B4"]
    assert [(i.id, i.label) for i in got.train] == [("images/1025794.jpg", 1)]


def test_unknown_dataset_lists_known_names():
    with pytest.raises(KeyError, match="oxford_pets"):
        load_dataset("oxford_petz", ".")


# ----------------------------------------------------------------------------------------------- few-shot

def synthetic_items(sizes) -> list[Item]:
    return [Item(f"/x/{c}/{k}.jpg", c, f"class {c}", f"{c}/{k}.jpg") for c, n in enumerate(sizes) for k in range(n)]


def test_fewshot_counts_and_determinism():
    items = synthetic_items([3, 20, 7, 1])
    picked = fewshot(items, 5, seed=1)
    assert Counter(it.label for it in picked) == {0: 3, 1: 5, 2: 5, 3: 1}
    assert set(picked) <= set(items) and len(set(picked)) == len(picked)
    assert fewshot(items, 5, seed=1) == picked
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert fewshot(shuffled, 5, seed=1) == picked           # independent of input order
    assert fewshot(items, 5, seed=2) != picked
    assert Counter(it.label for it in fewshot(items, 100, seed=0)) == {0: 3, 1: 20, 2: 7, 3: 1}
    with pytest.raises(ValueError):
        fewshot(items, 0, seed=1)


def test_fewshot_splits_and_cache_round_trip(demo_splits, tmp_path, monkeypatch):
    got = fewshot_splits(demo_splits, 5, seed=1, cache_dir=tmp_path)
    assert Counter(i.label for i in got.train) == {c: 5 for c in range(N_CLASSES)}
    assert Counter(i.label for i in got.val) == {c: VAL_PER_CLASS for c in range(N_CLASSES)}  # min(5, 4) > 2
    assert got.test == demo_splits.test
    path = tmp_path / "split_fewshot" / "shot_5-seed_1.json"
    doc = json.loads(path.read_text())
    assert [e[0] for e in doc["train"]] == [i.id for i in got.train]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary file left

    def no_draw(*a, **k):
        raise AssertionError("the cache should have been read")
    monkeypatch.setattr(protocols, "fewshot", no_draw)
    assert fewshot_splits(demo_splits, 5, seed=1, cache_dir=tmp_path) == got


def test_fewshot_cache_rejects_corrupted_and_mismatched(demo_splits, tmp_path):
    fewshot_splits(demo_splits, 2, seed=1, cache_dir=tmp_path)
    path = tmp_path / "split_fewshot" / "shot_2-seed_1.json"
    good = path.read_text()

    path.write_text(good[: len(good) // 2])
    with pytest.raises(FewShotCacheError, match="unreadable") as e:
        fewshot_splits(demo_splits, 2, seed=1, cache_dir=tmp_path)
    assert str(path) in str(e.value)

    path.write_text(good)
    fewer = demo_splits.replace(train=demo_splits.train[1:])
    with pytest.raises(FewShotCacheError, match="train split has changed"):
        fewshot_splits(fewer, 2, seed=1, cache_dir=tmp_path)

    (tmp_path / "split_fewshot" / "shot_2-seed_2.json").write_text(good)
    with pytest.raises(FewShotCacheError, match="seed is 1, expected 2"):
        fewshot_splits(demo_splits, 2, seed=2, cache_dir=tmp_path)

    doc = json.loads(good)
    doc["train"][0][1] = (doc["train"][0][1] + 1) % N_CLASSES
    path.write_text(json.dumps(doc))
    with pytest.raises(FewShotCacheError, match="not an image of the dataset"):
        fewshot_splits(demo_splits, 2, seed=1, cache_dir=tmp_path)

    other = demo_splits.replace(name="dtd")
    path.write_text(good)
    with pytest.raises(FewShotCacheError, match="dataset is 'imagefolder', expected 'dtd'"):
        fewshot_splits(other, 2, seed=1, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- base / novel

def test_base_novel_split(demo_splits):
    base, novel = subsample_classes(demo_splits, "base"), subsample_classes(demo_splits, "novel")
    assert base.classnames == demo_splits.classnames[:3] and novel.classnames == demo_splits.classnames[3:]
    assert base.subset == "base" and novel.subset == "novel"
    for sub, offset in ((base, 0), (novel, 3)):
        for split in ("train", "val", "test"):
            src = [i for i in getattr(demo_splits, split) if offset <= i.label < offset + sub.num_classes]
            got = getattr(sub, split)
            want = [(i.path, i.label, i.classname) for i in src]
            assert [(i.path, i.label + offset, i.classname) for i in got] == want
    assert {i.label for i in novel.train} == {0, 1}
    assert subsample_classes(demo_splits, "all") is demo_splits
    assert subsample_classes(demo_splits, "new") == novel
    with pytest.raises(ValueError):
        subsample_classes(demo_splits, "half")
    with pytest.raises(ValueError, match="already"):
        subsample_classes(base, "novel")


def test_base_novel_odd_and_single_class():
    s = Splits("x", ["a", "b", "c"], synthetic_items([1, 1, 1]), [], [], "{}")
    assert subsample_classes(s, "base").classnames == ["a", "b"]
    assert [i.label for i in subsample_classes(s, "novel").train] == [0]
    one = Splits("x", ["a"], synthetic_items([2]), [], [], "{}")
    assert subsample_classes(one, "base").num_classes == 1 and subsample_classes(one, "novel").train == []


def test_base_subset_has_its_own_cache_file(demo_splits, tmp_path):
    base = subsample_classes(demo_splits, "base")
    fewshot_splits(base, 1, seed=3, cache_dir=tmp_path)
    assert (tmp_path / "split_fewshot" / "shot_1-seed_3-base.json").is_file()


# ----------------------------------------------------------------------------------------------- templates

def test_templates():
    assert set(TEMPLATES) == set(DATASETS)
    assert all(t.count("{}") == 1 for t in TEMPLATES.values())
    assert TEMPLATES["oxford_pets"] == "a photo of a {}, a type of pet."
    assert TEMPLATES["food101"] == "a photo of {}, a type of food."
    assert TEMPLATES["eurosat"] == "a centered satellite photo of {}."
    assert TEMPLATES["ucf101"] == "a photo of a person doing {}."
    assert TEMPLATES["dtd"] == "{} texture."
    for n in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert TEMPLATES[n] == "a photo of a {}."


# ----------------------------------------------------------------------------------------------- transforms

def test_test_transform_shape_and_normalisation():
    out = clip_transforms(224)(photo("cat"))                  # 451 x 300, not square
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    grey = clip_transforms(40)(Image.new("RGB", (97, 61), (128, 64, 200)))
    want = (torch.tensor([128, 64, 200]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(grey, want.float()[:, None, None].expand(3, 40, 40), atol=2e-6, rtol=0)


def test_test_transform_resizes_shorter_side_then_center_crops():
    a = np.zeros((32, 96, 3), np.uint8)
    a[:, 32:64] = 255                                          # white centre third, black sides
    out = clip_transforms(32, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(a))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, torch.ones(3, 32, 32), atol=1e-6, rtol=0)


def test_train_transform_is_random_but_seeded():
    t = clip_transforms(32, train=True)
    im = photo("astronaut", 96)
    torch.manual_seed(0)
    a = t(im)
    torch.manual_seed(0)
    b = t(im)
    c = t(im)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------- loading

def test_image_dataset_item(demo_splits):
    ds = ImageDataset(demo_splits.test)
    x, y, i = ds[4]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert y == demo_splits.test[4].label and i == 4 and len(ds) == len(demo_splits.test)


def test_unreadable_and_missing_images_name_the_path(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    missing = tmp_path / "gone.jpg"
    for path in (bad, missing):
        ds = ImageDataset([Item(str(path), 0, "x")])
        with pytest.raises(ImageInputError, match=str(path)):
            ds[0]
        with pytest.raises(ImageInputError, match=str(path)):
            next(iter(make_loader(ds, 1)))


def test_16_bit_image_is_treated_alike_by_every_reader(tmp_path):
    """One image loader: a 16-bit grey image (a measurement, not light) is refused by the training / evaluation
    reader and by the API's reader with the same message, instead of being squashed to 0/255 RGB in one of them."""
    path = tmp_path / "depth.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(path)
    assert Image.open(path).mode.startswith("I")
    with pytest.raises(ImageInputError) as from_dataset:
        ImageDataset([Item(str(path), 0, "x")])[0]
    with pytest.raises(ImageInputError) as from_api:
        to_batch([str(path)], clip_transforms(32), (32, 32))
    assert str(from_dataset.value) == str(from_api.value) and "mode" in str(from_api.value)


def batches(loader):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def test_loader_batches_and_reproducibility(demo_splits):
    ds = ImageDataset(demo_splits.train, clip_transforms(32, train=True))
    n = len(ds)
    state = torch.random.get_rng_state()
    first = batches(make_loader(ds, 8, shuffle=True, seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    x, y, i = first[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == i.dtype == torch.int64
    assert y.tolist() == [demo_splits.train[k].label for k in i.tolist()]
    assert sorted(torch.cat([b[2] for b in first]).tolist()) == list(range(n))
    assert [len(b[2]) for b in first] == [8, 8, 8, n - 24]
    assert torch.cat([b[2] for b in first]).tolist() != list(range(n))       # shuffled

    def same(a, b):
        return all(torch.equal(u, v) for p, q in zip(a, b) for u, v in zip(p, q)) and len(a) == len(b)
    assert same(batches(make_loader(ds, 8, shuffle=True, seed=3)), first)
    assert same(batches(make_loader(ds, 8, shuffle=True, seed=3, workers=2)), first)
    assert not same(batches(make_loader(ds, 8, shuffle=True, seed=4)), first)
    loader = make_loader(ds, 8, shuffle=True, seed=3, drop_last=True)
    epoch1, epoch2 = batches(loader), batches(loader)
    assert len(epoch1) == n // 8 and not same(epoch1, epoch2)
    resumed = make_loader(ds, 8, shuffle=True, seed=3, drop_last=True)
    resumed.sampler.set_epoch(1)
    assert same(batches(resumed), epoch2)                                    # resume at epoch 1
    ordered = batches(make_loader(ds, 7, shuffle=False))
    assert torch.cat([b[2] for b in ordered]).tolist() == list(range(n))


def test_loader_shards_for_distributed_ranks(demo_splits):
    ds = ImageDataset(demo_splits.train, clip_transforms(16, train=True))       # 30 items
    shards = [torch.cat([b[2] for b in batches(make_loader(ds, 4, shuffle=True, seed=5, num_replicas=4, rank=r))])
              for r in range(4)]
    assert [len(s) for s in shards] == [8, 8, 8, 8]                            # ceil(30 / 4), padded
    assert set(torch.cat(shards).tolist()) == set(range(len(ds)))
    assert sum(len(set(s.tolist())) for s in shards) >= len(ds)
    with pytest.raises(ValueError, match="rank"):
        make_loader(ds, 4, num_replicas=2, rank=2)
