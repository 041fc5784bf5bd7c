"""load_clip without network: a pretrained tag that is neither cached nor reachable fails in seconds, not after
huggingface_hub's ~45 s of retries (clip._fail_fast_if_unavailable, hub_reachable); cached or reachable
weights are still handed to open_clip.
"""
import socket
from pathlib import Path
import threading
import time

import open_clip
import torch
import pytest

from intcoop import clip as clip_mod
from intcoop.clip import WeightsUnavailable, hub_reachable, load_clip, register_tiny_clip


class OpenClipCalled(Exception):
    pass


@pytest.fixture
def no_download(monkeypatch):
    """open_clip is never asked to download (it raises OpenClipCalled); HF_HUB_OFFLINE off."""
    import huggingface_hub.constants

    def fake_create(*args, **kwargs):
        raise OpenClipCalled(args)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("INTCOOP_SKIP_NETWORK_PROBE", raising=False)


def test_unreachable_and_not_cached_fails_fast_naming_tag_and_cache(no_download, monkeypatch):
    probed = []
    monkeypatch.setattr(clip_mod, "hub_reachable", lambda url, timeout=3.0: probed.append(url) or False)
    monkeypatch.setattr(clip_mod, "_cached_hub_file", lambda repo, names: None)
    import huggingface_hub.constants
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        load_clip("ViT-B-16", pretrained="openai")
    assert time.perf_counter() - t0 < 2.0
    msg = str(err.value)
    assert "'openai'" in msg and "ViT-B-16" in msg and "timm/vit_base_patch16_clip_224.openai" in msg
    assert huggingface_hub.constants.HF_HUB_CACHE in msg and "HF_HUB_OFFLINE=1" in msg and "pretrained=" in msg
    assert probed == [huggingface_hub.constants.ENDPOINT]


def test_offline_env_not_cached_fails_without_probe(no_download, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(clip_mod, "hub_reachable", lambda *a, **k: pytest.fail("probed although offline"))
    monkeypatch.setattr(clip_mod, "_cached_hub_file", lambda repo, names: None)
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        load_clip("ViT-B-16", pretrained="laion2b_s34b_b88k")


def test_cached_or_reachable_weights_go_to_open_clip(no_download, monkeypatch):
    """Cached: no probe; not cached but reachable: open_clip downloads. Either way open_clip is called."""
    seen = []
    monkeypatch.setattr(clip_mod, "_cached_hub_file", lambda repo, names: seen.append((repo, names)) or "/x.bin")
    monkeypatch.setattr(clip_mod, "hub_reachable", lambda *a, **k: pytest.fail("probed although cached"))
    with pytest.raises(WeightsUnavailable) as err:
        load_clip("ViT-B-16", pretrained="openai")
    assert isinstance(err.value.__cause__, OpenClipCalled)
    assert seen == [("timm/vit_base_patch16_clip_224.openai",
                     ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])]
    monkeypatch.setattr(clip_mod, "_cached_hub_file", lambda repo, names: None)
    monkeypatch.setattr(clip_mod, "hub_reachable", lambda *a, **k: True)
    with pytest.raises(WeightsUnavailable) as err:
        load_clip("ViT-B-16", pretrained="openai")
    assert isinstance(err.value.__cause__, OpenClipCalled)


def test_url_tag_uses_open_clip_url_cache(no_download, monkeypatch, tmp_path):
    """Without huggingface_hub open_clip downloads the tag's URL into ~/.cache/clip: the same check, that host."""
    import open_clip.pretrained as ocp
    monkeypatch.setattr(ocp, "has_hf_hub", lambda necessary=False: False)
    monkeypatch.setenv("HOME", str(tmp_path))
    url = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["url"]
    probed = []
    monkeypatch.setattr(clip_mod, "hub_reachable", lambda u, timeout=3.0: probed.append(u) or False)
    with pytest.raises(WeightsUnavailable) as err:
        load_clip("ViT-B-16", pretrained="openai")
    assert probed == [url] and str(tmp_path / ".cache" / "clip") in str(err.value) and "'openai'" in str(err.value)
    cached = tmp_path / ".cache" / "clip" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    with pytest.raises(WeightsUnavailable) as err:                 # cached: handed to open_clip, no probe
        load_clip("ViT-B-16", pretrained="openai")
    assert isinstance(err.value.__cause__, OpenClipCalled) and len(probed) == 1


def test_hub_reachable_local_listener_proxy_and_closed_port(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert hub_reachable(f"http://127.0.0.1:{port}/x", timeout=2.0)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")          # the proxy is what is probed
        assert hub_reachable("https://no-such-host.invalid/file", timeout=2.0)
        monkeypatch.delenv("HTTPS_PROXY")
    finally:
        server.close()
    t0 = time.perf_counter()
    assert not hub_reachable(f"http://127.0.0.1:{port}/x", timeout=2.0)   # closed now: refused at once
    assert time.perf_counter() - t0 < 4.5


def _huggingface_reachable() -> bool:
    ok = []

    def connect():
        try:
            socket.create_connection(("huggingface.co", 443), 3).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(8)
    return bool(ok)


def test_real_offline_call_returns_quickly(monkeypatch):
    """The real thing, no fakes: on a machine with no route to huggingface.co and an empty cache, the error comes
    in seconds (it took ~47 s before the probe)."""
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache
    if _huggingface_reachable():
        pytest.skip("huggingface.co is reachable from this machine; the test needs it unreachable")
    if any(isinstance(try_to_load_from_cache("timm/vit_base_patch16_clip_224.openai", f), str)
           for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        pytest.skip("ViT-B-16 openai weights are in the local Hugging Face cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("INTCOOP_SKIP_NETWORK_PROBE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="'openai'"):
        load_clip("ViT-B-16", pretrained="openai")
    assert time.perf_counter() - t0 < 15.0


def test_blip2_hub_id_unreachable_fails_fast(monkeypatch):
    """labels.load_blip2 with a hub id that is not cached: the same probe instead of minutes of retries (~216 s
    for Salesforce/blip2-opt-2.7b here before it)."""
    from intcoop.attributes.blip2 import ModelUnavailableError, load_blip2
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probed = []
    monkeypatch.setattr(clip_mod, "hub_reachable", lambda url, timeout=3.0: probed.append(url) or False)
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        load_blip2("intcoop-test/no-such-blip2")
    assert time.perf_counter() - t0 < 10.0 and len(probed) == 1
    assert "intcoop-test/no-such-blip2" in str(err.value) and "cannot be reached" in str(err.value)
    if not _huggingface_reachable():                                  # and the real probe on this machine
        monkeypatch.undo()
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("INTCOOP_SKIP_NETWORK_PROBE", raising=False)
        t0 = time.perf_counter()
        with pytest.raises(ModelUnavailableError, match="cannot be reached"):
            load_blip2("intcoop-test/no-such-blip2")
        assert time.perf_counter() - t0 < 15.0


# --------------------------------------------------------------------- OpenAI's computation from real checkpoints
def _openai_logits(ref, images, names):
    """OpenAI's CLIP zero-shot logits for "a photo of a {c}." computed by open_clip's own forward."""
    import torch
    import torch.nn.functional as F

    tok = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        img = F.normalize(ref.encode_image(images), dim=-1)
        txt = F.normalize(ref.encode_text(tok([f"a photo of a {c}." for c in names])), dim=-1)
        return ref.logit_scale.exp() * img @ txt.T


def _hub_cache(root, hf_hub: str, data: bytes):
    """Lay `data` out as the Hugging Face hub cache does: models--org--name/{blobs/<sha256>, snapshots/<commit>/
    <file> -> ../../blobs/<sha256>, refs/main}. hf_hub: open_clip's 'org/name/' (file open_clip_pytorch_model.bin)."""
    import hashlib
    import os

    repo, filename = os.path.split(hf_hub)
    folder = root / ("models--" + repo.replace("/", "--"))
    sha, commit = hashlib.sha256(data).hexdigest(), "0123456789abcdef0123456789abcdef01234567"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha).write_bytes(data)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / (filename or "open_clip_pytorch_model.bin")).symlink_to(Path("..") / ".." / "blobs" / sha)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_openai_tag_from_the_hub_cache_computes_openais_clip(tmp_path, monkeypatch):
    """Random weights in OpenAI's format as the `openai` tag's file in a Hugging Face cache, offline: the real
    ViT-B-16 tag path builds QuickGELU and gives OpenAI's zero-shot logits (open_clip's GELU build is 1e-3 off)."""
    import io
    import warnings

    import huggingface_hub.constants
    import torch

    import intcoop
    from intcoop.clip import activation_of

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    state = {k: v.half() for k, v in ref.state_dict().items()}     # OpenAI's weights are stored in fp16
    ref.load_state_dict(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    assert cfg["quick_gelu"] is True
    _hub_cache(tmp_path / "hub", cfg["hf_hub"], buf.getvalue())
    del buf, state
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*QuickGELU mismatch")
        model = intcoop.IntCoOp.from_clip("ViT-B-16", "openai", attributes="off")
    assert activation_of(model.clip) == "quick_gelu"
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    names = ["cat", "golden retriever", "x-ray of a lung"]
    want = _openai_logits(ref, images, names)
    got = intcoop.fast_logits(images, names, model)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    gelu = open_clip.create_model("ViT-B-16", pretrained=None).eval()   # what open_clip alone builds
    gelu.load_state_dict(ref.state_dict())
    assert (_openai_logits(gelu, images, names) - want).abs().max() > 1e-3


@pytest.fixture(scope="module")
def tiny_quick_name(tmp_path_factory):
    """"intcoop-tiny-quickgelu": the tiny config with QuickGELU, as open_clip names its QuickGELU twins."""
    import json

    from intcoop.clip import register_tiny_clip
    register_tiny_clip()
    cfg = dict(open_clip.get_model_config("intcoop-tiny"), quick_gelu=True)
    path = tmp_path_factory.mktemp("cfg") / "intcoop-tiny-quickgelu.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "intcoop-tiny-quickgelu"


def _tiny(quick: bool, seed: int):
    import torch
    torch.manual_seed(seed)
    from intcoop.clip import register_tiny_clip
    return open_clip.create_model(register_tiny_clip(), pretrained=None, force_quick_gelu=quick).eval()


def _traced(model, path):
    """An OpenAI-style release file: the model traced to a TorchScript archive."""
    import torch
    with torch.no_grad(), pytest.warns(FutureWarning):
        torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)),
                        check_trace=False).save(str(path))
    return str(path)


def test_local_openai_files_build_quick_gelu_and_a_gelu_file_is_not_taken_for_one(tmp_path, tiny_quick_name):
    """OpenAI's local formats (a TorchScript archive; a state dict extracted from one) build QuickGELU under the
    plain name and give the QuickGELU model's logits; a GELU-built archive or plain state dict builds GELU, and a
    GELU archive under the '-quickgelu' name is refused, never silently switched."""
    import torch

    import intcoop
    from intcoop.clip import load_clip

    quick, gelu = _tiny(True, 3), _tiny(False, 3)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    names = ["cat", "dog", "sea lion"]
    jit_quick = _traced(quick, tmp_path / "openai.pt")
    extracted = tmp_path / "extracted.pt"
    torch.save({**quick.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}, extracted)
    jit_gelu = _traced(gelu, tmp_path / "gelu.pt")
    plain = tmp_path / "plain.pt"
    torch.save(gelu.state_dict(), plain)
    for path, truth, activation in [(jit_quick, quick, "quick_gelu"), (str(extracted), quick, "quick_gelu"),
                                    (jit_gelu, gelu, "gelu"), (str(plain), gelu, "gelu")]:
        clip = load_clip("intcoop-tiny", path)
        assert clip.activation == activation, (path, clip.activation_source)
        model = intcoop.IntCoOp.from_clip("intcoop-tiny", path, attributes="off")
        torch.testing.assert_close(intcoop.fast_logits(images, names, model), _openai_logits(truth, images, names),
                                   rtol=0, atol=1e-4)
    assert "plain state dict" in load_clip("intcoop-tiny", str(plain)).activation_source
    hub = tmp_path / "snapshot"                                   # a hub snapshot: its open_clip_config.json says
    hub.mkdir()
    torch.save(quick.state_dict(), hub / "open_clip_pytorch_model.bin")
    (hub / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": true}}')
    assert load_clip("intcoop-tiny", str(hub / "open_clip_pytorch_model.bin")).activation == "quick_gelu"
    with pytest.raises(ValueError, match=r"built with nn\.GELU .*no QuickGELU.*'intcoop-tiny-quickgelu' says "
                                         r"QuickGELU"):
        load_clip(tiny_quick_name, jit_gelu)
    assert load_clip(tiny_quick_name, str(plain)).activation == "quick_gelu"   # the name states it: obeyed
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable CLIP checkpoint") as err:
        load_clip("intcoop-tiny", str(bad))
    assert "weights_only=False" not in str(err.value)


@pytest.mark.parametrize("word", ["none", "None", "null", "NULL"])
def test_pretrained_none_words_mean_random_weights(word):
    """pretrained="none" (as a config file or a shell would write it) is pretrained=None, not a tag lookup."""
    torch.manual_seed(0)
    a = load_clip(register_tiny_clip(), word)
    torch.manual_seed(0)
    b = load_clip(register_tiny_clip(), None)
    assert a.pretrained is None
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
