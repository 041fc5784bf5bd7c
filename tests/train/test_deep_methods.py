"""The deep-prompt methods (IVLP, VPT, MaPLe, PromptSRC) as configurations: each trains from its shipped config
(Python and the CLI), resumes after a crash to bit-identical parameters, runs under DDP (gloo, 2 processes) as in
one process, and evaluates through the fast path (`intcoop eval`, the one inference loop) to the reference logits.

Runs use the tiny CLIP of conftest (2 + 2 layers, so the depths are capped at 2) and real photos.
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import intcoop
from intcoop.config import apply_overrides, load_config, resolve_config, save_config
from intcoop.data import ImageDataset, clip_transforms
from intcoop.reference import reference_logits
from intcoop.train.checkpoint import load_trained, read_checkpoint
from intcoop.train.trainer import Trainer

from conftest import tiny_clip

TESTS = Path(__file__).resolve().parents[1]
METHODS = ["ivlp", "vpt", "maple", "promptsrc"]


class _Crash(RuntimeError):
    pass


def _overrides(name: str, root, out, epochs: int = 2) -> dict:
    """The shipped config of `name` on the tiny CLIP (depths capped at its 2 layers) and the small photo set."""
    mc = load_config(resolve_config(name)).model
    ov = {"model.clip": "intcoop-tiny", "model.pretrained": None, "model.text_depth": min(mc.text_depth, 2),
          "model.visual_depth": min(mc.visual_depth, 2), "data.dataset": "imagefolder", "data.root": str(root),
          "data.shots": 0, "data.workers": 0, "train.epochs": epochs, "train.batch_size": 8, "train.lr": 0.01,
          "train.log_every": 1, "train.out": str(out), "train.seed": 3}
    if name == "promptsrc":                            # GPA over this run's epochs
        ov.update({"train.gpa_mean": float(epochs), "train.gpa_std": 1.0})
    return ov


def _cfg(name, small, out, **kw):
    return load_config(resolve_config(name), _overrides(name, small.root, out, **kw))


def _model(cfg):
    clip = intcoop.clip.load_clip(tiny_clip())
    mc = cfg.model
    kw = {f.name: getattr(mc, f.name) for f in dataclasses.fields(mc) if f.name not in ("clip", "pretrained")}
    return intcoop.IntCoOp.from_clip(clip, **kw)


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max difference {(a[k] - b[k]).abs().max().item():.3g}"


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_resumes_and_evaluates(tmp_path, small, name):
    """Python API: the learned parameters move; a run killed in its second epoch and resumed ends bit-identical;
    the trained model's fast logits equal the reference on real photos."""
    cfg = _cfg(name, small, tmp_path / "a")
    model = _model(cfg)
    start = model.learnable_state_dict()
    Trainer(cfg, model, small.train, small.classnames, progress=False).fit()
    full = model.learnable_state_dict()
    learned = [k for k, p in model.prompt.named_parameters() if p.requires_grad]
    assert learned and all(not torch.equal(start[k], full[k]) for k in learned)
    if model.visual_prompted:
        assert any(k.startswith("visual.") for k in learned)

    def crash(trainer, info):
        if info["epoch"] == 1 and info["step_in_epoch"] == 1:
            raise _Crash("killed")
    cfg_b = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=str(tmp_path / "b")))
    with pytest.raises(_Crash):
        Trainer(cfg_b, _model(cfg), small.train, small.classnames, progress=False, callbacks=[crash]).fit()
    fresh = _model(cfg)
    Trainer(cfg_b, fresh, small.train, small.classnames, progress=False).fit(resume=True)
    _same(full, fresh.learnable_state_dict())

    ds = ImageDataset(small.test, clip_transforms(32))
    x = torch.stack([ds[i][0] for i in range(len(small.test))])
    with torch.no_grad():
        fast = intcoop.fast_logits(x, small.classnames, model)
        ref = reference_logits(model, x, small.classnames)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=2e-4)


def test_cli_trains_and_evaluates_a_deep_method(tmp_path, small):
    """`intcoop train --config maple --set ...` then `intcoop eval` on its checkpoint: the evaluation of the
    checkpoint equals the accuracy of the reloaded model's reference logits."""
    out = tmp_path / "run"
    sets = [a for k, v in _overrides("maple", small.root, out).items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "intcoop", "train", "--config", "maple", "--no-progress",
                          *sets], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = read_checkpoint(out / "last.pt")
    assert ckpt["config"]["model"]["visual_prompts"] == "coupled" and ckpt["epoch"] == 2
    ev = subprocess.run([sys.executable, "-m", "intcoop", "eval", "--checkpoint", str(out / "last.pt"), "--root",
                         str(small.root), "--split", "test", "--out", str(tmp_path / "eval")], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    model = load_trained(out / "last.pt")
    ds = ImageDataset(small.test, model.preprocess)
    x = torch.stack([ds[i][0] for i in range(len(small.test))])
    with torch.no_grad():
        pred = reference_logits(model, x, small.classnames).argmax(-1)
    acc = 100.0 * (pred == torch.tensor([it.label for it in small.test])).float().mean().item()
    rows = (tmp_path / "eval").glob("*.csv")
    text = "\n".join(p.read_text() for p in rows)
    assert f"{acc:.2f}" in text or f"{acc:.1f}" in text, (acc, text)


DDP_WORKER = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
import intcoop
from conftest import tiny_clip
from intcoop.clip import load_clip
from intcoop.config import load_config
from intcoop.data import load_dataset
from intcoop.train.trainer import Trainer
import dataclasses

cfg = load_config(sys.argv[1])
mc = cfg.model
kw = {{f.name: getattr(mc, f.name) for f in dataclasses.fields(mc) if f.name not in ("clip", "pretrained")}}
model = intcoop.IntCoOp.from_clip(load_clip(tiny_clip()), **kw)
sp = load_dataset("imagefolder", cfg.data.root)
Trainer(cfg, model, sp.train, sp.classnames, progress=False).fit()
torch.save(model.learnable_state_dict(), sys.argv[2] + os.environ["RANK"] + ".pt")
"""


@pytest.mark.parametrize("name", ["maple", "promptsrc"])
def test_ddp_gloo_two_processes_equals_one_process(tmp_path, small, name):
    """torchrun, 2 ranks (gloo): both end bit-identical, and equal to one process with the same global batch."""
    import socket

    cfg = _cfg(name, small, tmp_path / "ddp")
    save_config(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "w.py").write_text(DDP_WORKER.format(tests=str(TESTS)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(tmp_path / "w.py"), str(tmp_path / "cfg.yaml"), str(tmp_path / "rank")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _same(r0, r1)
    one_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=str(tmp_path / "one")))
    one = _model(cfg)
    Trainer(one_cfg, one, small.train, small.classnames, progress=False).fit()
    for k, v in one.learnable_state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=0, atol=1e-5, msg=k)


def test_feature_cache_is_refused_with_visual_prompts(tmp_path, small):
    with pytest.raises(ValueError, match="train.cache_features needs a frozen image tower"):
        apply_overrides(_cfg("ivlp", small, tmp_path), {"train.cache_features": True})
