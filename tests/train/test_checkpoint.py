"""Checkpoints that cannot be reloaded wrongly: the CLIP record (name, pretrained, activation, architecture,
weights fingerprint) and `load_trained` with nothing, a name, a name + file, or an instance: it reproduces the
saved logits or raises CheckpointMismatchError saying what differs; unreadable files say so without torch's
advice to retry with weights_only=False.
"""
import dataclasses

import open_clip
import pytest
import torch

import intcoop
from conftest import tiny_clip
from intcoop.clip import activation_of, fingerprint, register_tiny_clip
from intcoop.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from intcoop.demo.data import build_demo_dataset
from intcoop.data import ImageDataset, clip_transforms, load_dataset
from intcoop.train.checkpoint import (CheckpointMismatchError, clip_record, load_trained, read_checkpoint,
                                      save_checkpoint)
from intcoop.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    build_demo_dataset(root, classes=3, per_class=4, val_per_class=1, test_per_class=2, size=32, source="photos",
                       overwrite=True)
    sp = load_dataset("imagefolder", root)
    ds = ImageDataset(sp.test, clip_transforms(32))
    return sp, torch.stack([ds[i][0] for i in range(len(sp.test))])


def _cfg(out, model=None):
    return RunConfig(model=model or ModelConfig(), data=DataConfig(augment=False, workers=0),
                     train=TrainConfig(epochs=1, batch_size=4, lr=0.01, out=str(out), seed=3, log_every=1,
                                       regulariser="off", lambda_attr=0.0))


@pytest.fixture(scope="module")
def named(tmp_path_factory, data):
    """A run whose model is built from its config: intcoop-tiny, random weights from model.seed=5."""
    sp, x = data
    out = tmp_path_factory.mktemp("named")
    t = Trainer(_cfg(out, ModelConfig(clip="intcoop-tiny", pretrained=None, seed=5)), None, sp.train, sp.classnames,
                progress=False)
    t.fit()
    return out / "last.pt", intcoop.fast_logits(x, sp.classnames, t.model), t.model


def test_record_is_saved_and_named_checkpoint_reloads_exactly(named, data):
    path, want, model = named
    sp, x = data
    rec = read_checkpoint(path)["clip"]
    assert rec == clip_record(model) and rec["activation"] == "gelu" and rec["source"] == "random"
    assert rec["fingerprint"] == fingerprint(model.clip) and len(rec["fingerprint"]) == 64
    assert "activation=gelu" in (path.parent / "config.yaml").read_text()
    for kw in ({}, {"clip": "intcoop-tiny"}, {"clip": "intcoop-tiny", "pretrained": None}):
        again = load_trained(path, **kw)
        torch.testing.assert_close(intcoop.fast_logits(x, sp.classnames, again), want, rtol=0, atol=0)


def test_name_file_or_instance_of_another_clip_is_refused(named, tmp_path):
    path, _, model = named
    with pytest.raises(CheckpointMismatchError, match=r"model\.clip='intcoop-tiny'.*'ViT-B-32' is another "
                                                      r"architecture"):
        load_trained(path, clip="ViT-B-32")                      # before any weights are built
    other = tmp_path / "other.pt"                                 # same architecture, other weights, as a file
    torch.save(tiny_clip(seed=7).state_dict(), other)
    register_tiny_clip()
    with pytest.raises(CheckpointMismatchError, match=r"weights \(fingerprint"):
        load_trained(path, clip="intcoop-tiny", pretrained=str(other))
    with pytest.raises(CheckpointMismatchError, match=r"weights \(fingerprint"):
        load_trained(path, clip=tiny_clip(seed=7))                # a different random CLIP instance
    same = dataclasses.replace(model.config)                      # the very weights, in a QuickGELU build
    quick = open_clip.create_model("intcoop-tiny", pretrained=None, force_quick_gelu=True)
    quick.load_state_dict(model.clip.state_dict())
    assert activation_of(quick) == "quick_gelu" and same.seed == 5
    with pytest.raises(CheckpointMismatchError, match=r"activation gelu -> quick_gelu") as err:
        load_trained(path, clip=quick)
    assert "fingerprint" not in str(err.value)                    # the weights are the same: only that differs
    ok = load_trained(path, clip=model.clip)                       # the CLIP it was trained on: accepted
    assert ok.config.seed == 5


def test_tag_trained_checkpoint_reloads_by_tag_and_refuses_other_clips(tmp_path, monkeypatch):
    """ViT-B-16 'openai' (random weights in OpenAI's format in an offline Hugging Face cache): load_trained rebuilds
    it from the tag and reproduces the logits; the same name with random weights (GELU, other weights) and a
    ViT-B-32 instance (its prompt has the very same shapes) are refused, saying what differs."""
    import io

    import huggingface_hub.constants

    from test_clip import _hub_cache
    torch.manual_seed(0)
    state = {k: v.half() for k, v in open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    _hub_cache(tmp_path / "hub", open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"], buf.getvalue())
    del buf, state
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tagged = intcoop.IntCoOp.from_clip("ViT-B-16", "openai", attributes="off")
    with torch.no_grad():
        tagged.prompt.ctx.add_(0.01 * torch.randn(tagged.prompt.ctx.shape))   # a "trained" prompt
    path = tmp_path / "b16.pt"
    save_checkpoint(path, {"config": dataclasses.asdict(RunConfig(model=tagged.config)),
                           "prompt": tagged.learnable_state_dict(), "clip": clip_record(tagged)})
    assert read_checkpoint(path)["clip"]["source"] == "tag"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    names = ["cat", "dog"]
    again = load_trained(path)
    torch.testing.assert_close(intcoop.fast_logits(x, names, again), intcoop.fast_logits(x, names, tagged),
                               rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match=r"activation quick_gelu -> gelu.*weights \(fingerprint"):
        load_trained(path, clip="ViT-B-16", pretrained=None)
    b32 = open_clip.create_model("ViT-B-32", pretrained=None)
    with pytest.raises(CheckpointMismatchError, match=r"architecture \(patch_size \[16, 16\] -> \[32, 32\]"):
        load_trained(path, clip=b32)
    assert load_trained(path, clip=tagged.clip).prompt.ctx.equal(tagged.prompt.ctx)


def test_unreadable_files_say_so_without_weights_only_advice(named, tmp_path):
    path, _, _ = named
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: 2000])
    code = tmp_path / "code.pt"
    torch.save({"format": "x", "obj": torch.nn.Linear(2, 2)}, code)    # pickled code, not plain types
    for bad in (cut, code):
        with pytest.raises(CheckpointMismatchError, match="not a readable intcoop checkpoint") as err:
            load_trained(bad)
        assert "weights_only=False" not in str(err.value) and "weights_only" not in str(err.value), str(err.value)
