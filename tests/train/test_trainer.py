"""Training (intcoop.train: trainer, step, inputs, checkpoint): learning on real photos, resume after a crash = uninterrupted,
DDP (gloo, 2 processes under torchrun) = one process, feature cache = no cache, torch.compile, checkpoints.

The tiny CLIP of conftest (random weights, 32 px) and small datasets of real photographs (intcoop.data.demo,
source "photos": seeded crops of the scikit-image / scikit-learn sample photos) keep every run to seconds.
"""
import csv
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import intcoop
from intcoop import config as config_mod
from intcoop.train import trainer as trainer_mod
from intcoop.train.checkpoint import CheckpointMismatchError, check_compatible, load_trained, read_checkpoint
from intcoop.config import DataConfig, RunConfig, TrainConfig, load_config, save_config
from intcoop.data import ImageDataset, clip_transforms, load_dataset
from intcoop.demo.data import build_demo_dataset
from intcoop.attributes.labels_file import write_labels
from intcoop.cli.train import train_main
from intcoop.train.trainer import Trainer
from intcoop.train.inputs import add_label_noise
from intcoop.train.step import check_train_config, lr_factor

TESTS = Path(__file__).resolve().parents[1]   # tests/, where conftest.py lives
WORDS = ["red", "green", None, "blue", "shiny", "striped"]


@pytest.fixture(scope="module")
def small_labels(small):
    return {it.id: WORDS[i % len(WORDS)] for i, it in enumerate(small.train)}


def _model(clip, **kw):
    torch.manual_seed(0)                        # the prompt learner's layers draw from the global RNG
    return intcoop.IntCoOp.from_clip(clip, **kw)


def _cfg(out, augment=True, workers=0, **train):
    base = dict(epochs=3, batch_size=8, lr=0.01, out=str(out), seed=3, log_every=1)
    return RunConfig(train=TrainConfig(**{**base, **train}), data=DataConfig(augment=augment, workers=workers))


def _free_port() -> int:
    """A TCP port free right now (the OS picks it), for torchrun's rendezvous: two runs never share one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max difference {(a[k] - b[k]).abs().max().item():.3g}"


def _images(items):
    ds = ImageDataset(items, clip_transforms(32))
    return torch.stack([ds[i][0] for i in range(len(items))]), torch.tensor([it.label for it in items])


# ----------------------------------------------------------------------------------------------- learning
def test_training_learns_real_photos(tmp_path, clip_tiny):
    """10 classes of real photos, 16 shots: loss falls and held-out accuracy is far above chance (0.1).
    Measured over 6 (tiny-CLIP, data, run) seeds: test accuracy 0.37-0.69, last/first loss 0.47-0.79."""
    root = build_demo_dataset(tmp_path / "photos", classes=10, per_class=16, val_per_class=1, test_per_class=20,
                              size=32, seed=0, source="photos")
    sp = load_dataset("imagefolder", root)
    model = _model(clip_tiny)
    cfg = _cfg(tmp_path / "run", augment=False, epochs=8, batch_size=16, lr=0.02, warmup_epochs=0,
               regulariser="off", cache_features=True, log_every=5)
    with pytest.warns(UserWarning, match="attribute loss is skipped"):
        trainer = Trainer(cfg, model, sp.train, sp.classnames, progress=False)
        trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(5, 81, 5))
    first = sum(float(r["loss"]) for r in rows[:2]) / 2
    last = sum(float(r["loss"]) for r in rows[-2:]) / 2
    assert last < 0.9 * first, (first, last)
    x, y = _images(sp.test)
    acc = (intcoop.fast_logits(x, sp.classnames, model).argmax(-1) == y).float().mean().item()
    assert acc >= 0.3, acc
    assert abs(trainer.evaluate(sp.test) - acc) < 1e-6
    # the checkpoint rebuilds the same model
    again = load_trained(tmp_path / "run" / "last.pt", clip=clip_tiny)
    torch.testing.assert_close(intcoop.fast_logits(x[:7], sp.classnames, again),
                               intcoop.fast_logits(x[:7], sp.classnames, model), rtol=0, atol=0)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.train == cfg.train and saved.model == model.config


# ------------------------------------------------------------------------------------ resume, cache, DDP
class _Crash(RuntimeError):
    pass


def _crash_at(epoch, step_in_epoch):
    def callback(trainer, info):
        if info["epoch"] == epoch and info["step_in_epoch"] == step_in_epoch:
            raise _Crash(f"killed at epoch {epoch} step {step_in_epoch}")
    return callback


def test_resume_after_crash_mid_epoch_equals_uninterrupted(tmp_path, clip_tiny, small, small_labels):
    """Augmentation on, attribute labels with label noise, attribute regulariser: a run killed in the middle of
    its second epoch and resumed ends with bit-identical parameters and the same metrics rows."""
    full = _model(clip_tiny)
    Trainer(_cfg(tmp_path / "a", regulariser="attribute", label_noise=0.3), full, small.train, small.classnames,
            small_labels, progress=False).fit()
    full = full.learnable_state_dict()
    model = _model(clip_tiny)
    cfg = _cfg(tmp_path / "b", regulariser="attribute", label_noise=0.3)
    with pytest.raises(_Crash):
        Trainer(cfg, model, small.train, small.classnames, small_labels, progress=False,
                callbacks=[_crash_at(1, 1)]).fit()
    assert read_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    fresh = _model(clip_tiny)                               # a new process: nothing survives but the files
    Trainer(cfg, fresh, small.train, small.classnames, small_labels, progress=False).fit(resume=True)
    _same(full, fresh.learnable_state_dict())
    cols = ("epoch", "step", "lr", "loss", "ce", "attr", "reg", "acc")
    rows = [[{k: r[k] for k in cols} for r in csv.DictReader(open(tmp_path / d / "metrics.csv"))]
            for d in "ab"]
    assert rows[0] == rows[1] and len(rows[0]) == 9
    a, b = (read_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["step"] == b["step"] == 9 and a["epoch"] == b["epoch"] == 3
    _same(a["optimizer"]["state"][0], b["optimizer"]["state"][0])


def test_cli_run_killed_then_resumed_equals_uninterrupted(tmp_path, small):
    """A real process (`python -m intcoop train`) SIGKILLed at some point after its second epoch's checkpoint,
    then `--resume`d, ends bit-identical to an uninterrupted run (model and 4-shot data built from the config)."""
    import signal
    import time

    from intcoop.config import ModelConfig
    cfg = RunConfig(model=ModelConfig(clip="intcoop-tiny", pretrained=None),
                    data=DataConfig(dataset="imagefolder", root=small.root, shots=4, augment=True, workers=0),
                    train=TrainConfig(epochs=40, batch_size=8, lr=0.01, seed=3, log_every=2))
    save_config(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(out, *extra):
        return [sys.executable, "-m", "intcoop", "train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out),
                "--no-progress", *extra]
    subprocess.run(cli(tmp_path / "a"), check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.Popen(cli(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = tmp_path / "b" / "last.pt", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and read_checkpoint(last)["epoch"] >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(last)["epoch"]
    assert 2 <= killed_at < 40, killed_at
    subprocess.run(cli(tmp_path / "b", "--resume"), check=True, env=env, capture_output=True, timeout=300)
    a, b = read_checkpoint(tmp_path / "a" / "last.pt"), read_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 40 and a["step"] == b["step"]
    _same(a["prompt"], b["prompt"])
    rows = [(tmp_path / d / "metrics.csv").read_text().splitlines() for d in "ab"]
    strip = [[",".join(r.split(",")[:8]) for r in rs] for rs in rows]     # images/s differs, the rest must not
    assert strip[0] == strip[1]


def _children_with_rank(pid: int, rank: int) -> list[int]:
    """PIDs of `pid`'s child processes whose environment has RANK=rank (torchrun's workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and f"RANK={rank}".encode() in env:
            found.append(int(d.name))
    return found


def test_torchrun_rank_killed_restarts_and_resumes_to_the_uninterrupted_run(tmp_path, small):
    """The README's launch (`torchrun --standalone --nproc_per_node 2 -m intcoop train`) with --max-restarts 1:
    rank 1 SIGKILLed after the second epoch's checkpoint; torchrun restarts both workers, the trainer resumes by
    itself from the job's last.pt, and the run ends bit-identical to the same launch left alone."""
    import signal
    import time

    from intcoop.config import ModelConfig
    epochs = 40
    cfg = RunConfig(model=ModelConfig(clip="intcoop-tiny", pretrained=None),
                    data=DataConfig(dataset="imagefolder", root=small.root, shots=4, augment=True, workers=0),
                    train=TrainConfig(epochs=epochs, batch_size=8, lr=0.01, seed=3, log_every=2))
    save_config(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "--max-restarts", "1", "-m", "intcoop", "train", "--config",
                                 str(tmp_path / "cfg.yaml"), "--out", str(out), "--no-progress"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    alone = launch(tmp_path / "a")                  # one job at a time: two jobs' gloo meshes must not meet
    try:
        out_a, _ = alone.communicate(timeout=90)
    finally:
        if alone.poll() is None:
            alone.kill()
    assert alone.returncode == 0, out_a[-3000:]
    killed = launch(tmp_path / "b")
    try:
        last, deadline = tmp_path / "b" / "last.pt", time.monotonic() + 90
        while time.monotonic() < deadline and killed.poll() is None:
            if last.exists() and read_checkpoint(last)["epoch"] >= 2:
                break
            time.sleep(0.01)
        victims = _children_with_rank(killed.pid, 1)
        assert killed.poll() is None and len(victims) == 1, "the run ended (or has no rank 1) before the kill"
        os.kill(victims[0], signal.SIGKILL)
        killed_at = read_checkpoint(last)["epoch"]
        out_b, _ = killed.communicate(timeout=120)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == 0, out_b[-3000:]
    assert 2 <= killed_at < epochs
    assert "elastic restart 1 of torchrun job" in out_b and "resuming from" in out_b, out_b[-3000:]
    a, b = read_checkpoint(tmp_path / "a" / "last.pt"), read_checkpoint(last)
    assert a["epoch"] == b["epoch"] == epochs and a["step"] == b["step"]
    _same(a["prompt"], b["prompt"])
    rows = [(tmp_path / d / "metrics.csv").read_text().splitlines() for d in "ab"]
    strip = [[",".join(r.split(",")[:8]) for r in rs] for rs in rows]     # images/s differs, the rest must not
    assert strip[0] == strip[1]


def test_cache_features_gives_the_same_result(tmp_path, clip_tiny, small, small_labels):
    out = {}
    for cache in (False, True):
        model = _model(clip_tiny)
        cfg = _cfg(tmp_path / str(cache), augment=False, cache_features=cache, epochs=2)
        trainer = Trainer(cfg, model, small.train, small.classnames, small_labels, progress=False)
        trainer.fit()
        assert (trainer.cache is not None) == cache
        out[cache] = model.learnable_state_dict()
    _same(out[False], out[True])
    with pytest.warns(UserWarning, match="cache_features is ignored"):
        trainer = Trainer(_cfg(tmp_path / "aug", cache_features=True, epochs=1), _model(clip_tiny), small.train,
                          small.classnames, small_labels, progress=False)
        trainer.fit()
    assert trainer.cache is None


DDP_WORKER = """
import sys
sys.path.insert(0, {tests!r})
import torch
from conftest import tiny_clip
import intcoop
from intcoop.train import trainer
from intcoop.cli.train import main
from intcoop.clip import load_clip

def tiny_model(mc):
    clip = load_clip(tiny_clip())
    torch.manual_seed(0)
    return intcoop.IntCoOp.from_clip(clip)

trainer.build_model = tiny_model
main(sys.argv[1:])
"""


def test_ddp_gloo_two_processes_equals_one_process(tmp_path, small, small_labels, clip_tiny, monkeypatch):
    """`torchrun --nproc_per_node 2 -m`-style launch through the CLI entry point (gloo on CPU): both ranks end
    with identical parameters, equal (to float rounding) to one process with the same global batch."""
    labels = tmp_path / "labels.jsonl"
    write_labels(labels, [{"id": k, "class": "x", "answer": w, "attribute": w, "model": "test"}
                          for k, w in small_labels.items()])
    cfg = _cfg(tmp_path / "ddp", epochs=2, regulariser="attribute", label_noise=0.3)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="imagefolder", root=small.root,
                                                            shots=0, labels=str(labels)))
    save_config(cfg, tmp_path / "cfg.yaml")
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(worker), "--config",
                           str(tmp_path / "cfg.yaml"), "--no-progress"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["epoch"] == 2 and ddp["step"] == 6                   # 24 images, global batch 8
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6                                      # rank 0 alone writes
    # the same run in one process, through train_main
    monkeypatch.setattr(trainer_mod, "build_model", lambda mc: _model(clip_tiny))
    train_main(tmp_path / "cfg.yaml", ["train.out=" + str(tmp_path / "one")], progress=False)
    one = read_checkpoint(tmp_path / "one" / "last.pt")
    for k, v in one["prompt"].items():
        torch.testing.assert_close(ddp["prompt"][k], v, rtol=0, atol=1e-5, msg=k)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["config.yaml", "last.pt", "metrics.csv"]


DDP_RANKS = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
from conftest import tiny_clip
import intcoop
from intcoop.clip import load_clip
from intcoop.config import load_config
from intcoop.data import load_dataset
from intcoop.train.trainer import Trainer

clip = load_clip(tiny_clip())
torch.manual_seed(0)
model = intcoop.IntCoOp.from_clip(clip, attributes="oracle")
cfg = load_config(sys.argv[1])
sp = load_dataset("imagefolder", cfg.data.root)
Trainer(cfg, model, sp.train, sp.classnames, cfg.data.labels, progress=False).fit()
torch.save(model.learnable_state_dict(), sys.argv[2] + os.environ["RANK"] + ".pt")
"""


def test_ddp_ranks_end_identical_oracle(tmp_path, small, small_labels):
    """Two ranks (oracle attributes: BLIP-2 words in the prompt, unused-parameter detection) end bit-identical."""
    labels = tmp_path / "labels.jsonl"
    write_labels(labels, [{"id": k, "class": "x", "answer": w, "attribute": w, "model": "test"}
                          for k, w in small_labels.items()])
    cfg = _cfg(tmp_path / "out", epochs=1, augment=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=small.root, labels=str(labels)))
    save_config(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "w.py").write_text(DDP_RANKS.format(tests=str(TESTS)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(tmp_path / "w.py"), str(tmp_path / "cfg.yaml"),
                           str(tmp_path / "rank")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _same(r0, r1)
    _same(r0, read_checkpoint(tmp_path / "out" / "last.pt")["prompt"])


def test_bf16_autocast_tracks_fp32(tmp_path, clip_tiny, small, small_labels):
    """precision=bf16 (what "auto" picks on a GPU) through CPU autocast: the same run to bf16 accuracy."""
    out = {}
    for prec in ("fp32", "bf16"):
        model = _model(clip_tiny)
        cfg = _cfg(tmp_path / prec, augment=False, epochs=2, warmup_epochs=0, precision=prec,
                   regulariser="attribute")
        out[prec] = (Trainer(cfg, model, small.train, small.classnames, small_labels, progress=False).fit(),
                     model.learnable_state_dict())
    (m32, p32), (m16, p16) = out["fp32"], out["bf16"]
    for k in ("loss", "ce", "attr", "reg"):
        assert abs(m16[k] - m32[k]) < 0.02 * max(1.0, abs(m32[k])), k
    assert any(not torch.equal(p16[k], p32[k]) for k in p32)                # bf16 did run
    for k in p32:
        torch.testing.assert_close(p16[k], p32[k], rtol=0, atol=0.02, msg=k)


def test_oracle_passes_label_targets_to_the_prompt(tmp_path, clip_tiny, small, small_labels, monkeypatch):
    """attributes='oracle': each image's BLIP-2 word embedding (NaN row when unlabelled) reaches prompt_prefix;
    validation runs with the predicted attributes."""
    from intcoop.attributes.vocab import attribute_targets
    model = _model(clip_tiny, attributes="oracle")
    seen = []
    original = model.prompt_prefix

    def spy(*a, attr_targets=None, **kw):
        seen.append(attr_targets)
        return original(*a, attr_targets=attr_targets, **kw)
    monkeypatch.setattr(model, "prompt_prefix", spy)
    metrics = Trainer(_cfg(tmp_path, epochs=1, augment=False, batch_size=24), model, small.train, small.classnames,
                      small_labels, progress=False, val_items=small.val).fit()
    assert 0 <= metrics["val_acc"] <= 1 and seen[-1].isnan().all()       # validation: no labels
    got = seen[0]                                                        # the one training step: all 24 items
    words = [small_labels[it.id] for it in small.train]
    want = attribute_targets(words, clip_tiny.model, clip_tiny.tokenizer).emb
    want[[w is None for w in words]] = float("nan")

    def rows(t):                                                         # the batch order is shuffled
        return sorted(t.tolist(), key=lambda r: (r[0] != r[0], r[0] if r[0] == r[0] else 0.0))
    assert got.shape == want.shape
    for g, w in zip(rows(got), rows(want)):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), equal_nan=True)


# ------------------------------------------------------------------------------------------ torch.compile
def test_compile_runs_and_matches_eager(tmp_path, clip_tiny, small, small_labels):
    """compile=True: one step through torch.compile (backend aot_eager: dynamo capture and AOTAutograd, the parts
    that can break; inductor's C++ code generation takes over a minute on this 2-core machine), no graph
    break in the step, and the same parameters as eager."""
    out = {}
    for compiled in (False, True):
        model = _model(clip_tiny)
        cfg = _cfg(tmp_path / str(compiled), augment=False, epochs=1, batch_size=24, warmup_epochs=0,
                   compile=compiled, regulariser="attribute")
        trainer = Trainer(cfg, model, small.train, small.classnames, small_labels, progress=False,
                          compile_backend="aot_eager")
        trainer.fit()
        out[compiled] = model.learnable_state_dict()
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-5, atol=1e-6, msg=k)
    batch = next(iter(trainer.loader))
    explained = torch._dynamo.explain(trainer._eager)(*trainer._batch_inputs(batch))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compile_failure_falls_back_with_a_warning(tmp_path, clip_tiny, small, monkeypatch):
    def broken(module, **kw):
        def fn(*a, **k):
            raise RuntimeError("inductor exploded")
        return fn
    monkeypatch.setattr(torch, "compile", broken)
    model = _model(clip_tiny, attributes="off")
    with pytest.warns(UserWarning, match="torch.compile failed .*inductor exploded"):
        Trainer(_cfg(tmp_path, epochs=1, compile=True, regulariser="off"), model, small.train, small.classnames,
                progress=False).fit()
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 3


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip_tiny, small, small_labels):
    out = tmp_path_factory.mktemp("trained")
    model = _model(clip_tiny)
    Trainer(_cfg(out, epochs=1), model, small.train, small.classnames, small_labels, progress=False).fit()
    return out / "last.pt", model


def test_checkpoint_loads_weights_only(trained, clip_tiny):
    path, model = trained
    ckpt = torch.load(path, weights_only=True)                     # plain types and tensors only
    assert set(ckpt) >= {"config", "prompt", "optimizer", "scheduler", "epoch", "step", "rng", "classnames"}
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python", "loader"}
    _same(ckpt["prompt"], model.learnable_state_dict())
    assert not any(k.startswith(("clip", "tower")) for k in ckpt["prompt"])   # nothing of CLIP is saved
    loaded = load_trained(path, clip=clip_tiny)
    _same(loaded.learnable_state_dict(), model.learnable_state_dict())
    assert not loaded.training


def test_load_trained_rebuilds_a_config_built_random_clip(tmp_path, small):
    """A model built from its config (named CLIP, random weights) is rebuilt by load_trained alone: same logits."""
    from intcoop.config import ModelConfig
    cfg = dataclasses.replace(_cfg(tmp_path, epochs=1, regulariser="off", lambda_attr=0.0),
                              model=ModelConfig(clip="intcoop-tiny", pretrained=None, seed=5))
    trainer = Trainer(cfg, None, small.train, small.classnames, progress=False)
    trainer.fit()
    again = load_trained(tmp_path / "last.pt")             # rebuilt from model.seed=5 and verified (fingerprint)
    x, _ = _images(small.test)
    torch.testing.assert_close(intcoop.fast_logits(x, small.classnames, again),
                               intcoop.fast_logits(x, small.classnames, trainer.model), rtol=0, atol=0)


@pytest.mark.parametrize("change, field", [
    (dict(n_ctx=2, ctx_init=""), "n_ctx"), (dict(conditioning="additive"), "conditioning"),
    (dict(attributes="off"), "attributes"), (dict(attr_tokens=2), "attr_tokens"),
    (dict(attr_hidden=32), "attr_hidden"), (dict(heads=2), "heads"), (dict(suffix="{}!"), "suffix")])
def test_checkpoint_mismatch_names_the_field(trained, clip_tiny, change, field):
    path, _ = trained
    with pytest.raises(CheckpointMismatchError, match=rf"model\.{field}="):
        _load_into(path, _model(clip_tiny, **change))


def _load_into(path, model):
    from intcoop.train.checkpoint import load_prompt_state
    load_prompt_state(model, read_checkpoint(path), str(path))


def test_checkpoint_mismatch_clip_name_and_shapes(trained, clip_tiny):
    path, _ = trained
    ckpt = read_checkpoint(path)
    saved = dict(ckpt["config"]["model"], clip="ViT-B-16", pretrained="openai")
    model = _model(clip_tiny)
    model.config = dataclasses.replace(model.config, clip="ViT-B-32", pretrained="openai")
    with pytest.raises(CheckpointMismatchError, match=r"model\.clip='ViT-B-16'.*'ViT-B-32'"):
        check_compatible(saved, model)
    model.config = dataclasses.replace(model.config, clip="ViT-B-16", pretrained="laion2b_s34b_b88k")
    with pytest.raises(CheckpointMismatchError, match=r"model\.pretrained='openai'"):
        check_compatible(saved, model)
    import open_clip                                                # another CLIP text width: the shapes differ
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from intcoop.clip import load_clip
    wide = open_clip.model.CLIP(embed_dim=48, vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32,
                                patch_size=8, image_size=32),
                                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=96, heads=4, layers=1))
    with pytest.raises(CheckpointMismatchError, match=r"parameter prompt\.ctx has shape \(4, 64\).*\(4, 96\)"):
        _load_into(path, _model(load_clip(wide)))
    bad = path.parent / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointMismatchError, match="not an intcoop-checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointMismatchError, match="CLIP model instance"):
        load_trained(path)                                          # trained on an instance: clip= is needed


# -------------------------------------------------------------------------------------- checks and pieces
def test_checks_before_work(tmp_path, clip_tiny, small, small_labels):
    model = _model(clip_tiny)
    with pytest.raises(ValueError, match="class list is empty"):
        Trainer(_cfg(tmp_path), model, small.train, [], progress=False)
    with pytest.raises(ValueError, match="no training items"):
        Trainer(_cfg(tmp_path), model, [], small.classnames, progress=False)
    with pytest.raises(ValueError, match="labels outside 0..1"):
        Trainer(_cfg(tmp_path), model, small.train, small.classnames[:2], progress=False)
    stray = {**small_labels, "not/a/training/image.jpg": "red"}
    with pytest.warns(UserWarning, match="1 of .* label id.* not training items"):
        Trainer(_cfg(tmp_path, epochs=1), model, small.train, small.classnames, stray, progress=False).fit()
    with pytest.raises(ValueError, match="oracle.*needs labels"):
        Trainer(_cfg(tmp_path / "oracle"), _model(clip_tiny, attributes="oracle"), small.train, small.classnames,
                progress=False).fit()
    with pytest.raises(ValueError, match="regulariser"):
        Trainer(_cfg(tmp_path, regulariser="kg"), model, small.train, small.classnames)


def test_rerun_refuses_to_overwrite_a_run_unless_told(tmp_path, clip_tiny, small, monkeypatch):
    """A finished (or interrupted) run's folder: a rerun without resume is refused before any work; overwrite=True
    deletes its checkpoints and starts again; under torchrun a restart resumes only from its own job's last.pt."""
    from intcoop.train.trainer import RunExistsError
    cfg = _cfg(tmp_path, epochs=2, regulariser="off")
    first = Trainer(cfg, _model(clip_tiny), small.train, small.classnames, progress=False)
    first.fit()
    before = (tmp_path / "last.pt").read_bytes()
    steps = []
    again = Trainer(cfg, _model(clip_tiny), small.train, small.classnames, progress=False,
                    callbacks=[lambda t, info: steps.append(info["step"])])
    monkeypatch.setattr(again, "_prepare", lambda: pytest.fail("work started before the refusal"))
    with pytest.raises(RunExistsError, match=r"holds a run \(2 of 2 epochs done: last\.pt\).*--resume.*--overwrite"):
        again.fit()
    assert (tmp_path / "last.pt").read_bytes() == before and not steps
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")            # a restart of ANOTHER torchrun job: refused
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-job")
    with pytest.raises(RunExistsError):
        Trainer(cfg, _model(clip_tiny), small.train, small.classnames, progress=False).fit()
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    third = Trainer(cfg, _model(clip_tiny), small.train, small.classnames, progress=False, overwrite=True,
                    callbacks=[lambda t, info: steps.append(info["step"])])
    third.fit()
    assert steps[0] == 1 and read_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    _same(third.model.learnable_state_dict(), first.model.learnable_state_dict())   # started again, from scratch


def test_cli_train_refuses_a_rerun_unless_overwrite(tmp_path, small, capsys):
    """`intcoop train` twice into one --out: the second exits 2 with one line naming --resume and --overwrite;
    with --overwrite it trains again."""
    from intcoop.cli import main
    from intcoop.config import ModelConfig
    cfg = RunConfig(model=ModelConfig(clip="intcoop-tiny", pretrained=None),
                    data=DataConfig(dataset="imagefolder", root=small.root, shots=2, augment=False, workers=0),
                    train=TrainConfig(epochs=1, batch_size=4, seed=3, regulariser="off"))
    save_config(cfg, tmp_path / "cfg.yaml")
    argv = ["train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    first = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a run (1 of 1 epochs done" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == first
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns != first


def test_nan_loss_stops_naming_the_step(tmp_path, clip_tiny, small):
    def poison(trainer, info):
        if info["step"] == 2:
            with torch.no_grad():
                trainer.model.prompt.ctx.fill_(float("nan"))
    model = _model(clip_tiny, attributes="off")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 1, step 3 \(loss nan"):
        Trainer(_cfg(tmp_path, regulariser="off"), model, small.train, small.classnames, progress=False,
                callbacks=[poison]).fit()
    assert not (tmp_path / "last.pt").exists()


class _Board:
    """Stands in for TensorBoard's SummaryWriter (tensorboard is not installed here)."""

    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_schedule_metrics_progress_validation(tmp_path, clip_tiny, small, monkeypatch):
    """Per-epoch schedule (warm-up, then cosine over the remaining epochs) as logged; metrics.csv, TensorBoard
    scalars, the progress bar, validation accuracy and best.pt."""
    tc = TrainConfig(epochs=5, lr=0.002, warmup_epochs=1, warmup_lr=1e-5)
    lrs = [tc.lr * lr_factor(e, tc) for e in range(5)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(0.002)
    assert lrs[2:] == pytest.approx([0.002 * (1 + torch.cos(torch.tensor(torch.pi * t / 4)).item()) / 2
                                     for t in (1, 2, 3)])
    board = _Board()
    monkeypatch.setattr(trainer_mod, "_tensorboard", lambda folder: board)
    model = _model(clip_tiny, attributes="off")
    cfg = _cfg(tmp_path, epochs=5, batch_size=24, lr=0.002, warmup_epochs=1, warmup_lr=1e-5, regulariser="off")
    metrics = Trainer(cfg, model, small.train, small.classnames, progress=True, val_items=small.val).fit()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    train_rows = [r for r in rows if r["loss"]]
    assert [float(r["lr"]) for r in train_rows] == pytest.approx(lrs, rel=1e-5)
    val = [float(r["val_acc"]) for r in rows if r["val_acc"]]
    assert len(val) == 5 and all(0 <= v <= 1 for v in val)
    assert metrics["val_acc"] == pytest.approx(val[-1])
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["metrics"]["best_val_acc"] == pytest.approx(max(val))
    assert [v for t, v, _ in board.scalars if t == "train/lr"] == pytest.approx(lrs, rel=1e-5)
    assert board.closed


def test_label_noise_is_seeded_and_changes_the_fraction():
    words = [WORDS[i % 6] for i in range(60)]
    noisy, n = add_label_noise(words, 0.25, seed=1)
    labelled = sum(w is not None for w in words)
    assert n == round(0.25 * labelled)
    changed = [i for i, (a, b) in enumerate(zip(words, noisy)) if a != b]
    assert len(changed) == n and all(words[i] is not None and noisy[i] is not None for i in changed)
    assert add_label_noise(words, 0.25, seed=1) == (noisy, n)
    assert add_label_noise(words, 0.25, seed=2)[0] != noisy
    assert add_label_noise(words, 0.0, seed=1) == (words, 0)


def test_shipped_configs_load():
    names = sorted(p.stem for p in config_mod.CONFIG_DIR.glob("*.yaml"))
    assert {"intcoop", "coop", "cocoop", "kgcoop", "demo_cpu"} <= set(names)
    for name in names:
        cfg = load_config(config_mod.resolve_config(name))
        check_train_config(cfg.train)
    coop, cocoop, kg = (load_config(config_mod.resolve_config(n)) for n in ("coop", "cocoop", "kgcoop"))
    assert (coop.model.conditioning, coop.model.attributes, coop.train.regulariser) == ("none", "off", "off")
    assert (cocoop.model.conditioning, cocoop.model.attributes) == ("additive", "off")
    assert (kg.model.conditioning, kg.train.regulariser, kg.train.lambda_reg) == ("none", "class", 8.0)
    assert config_mod.parse_overrides(["train.lr=0.01", "model.ctx_init=a photo of a"]) == {
        "train.lr": 0.01, "model.ctx_init": "a photo of a"}
    with pytest.raises(FileNotFoundError, match="shipped config"):
        config_mod.resolve_config("no_such_config")
