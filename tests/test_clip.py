"""load_clip without network: a pretrained tag that is neither cached nor reachable fails in seconds, not after
huggingface_hub's ~45 s of retries (backbone._fail_fast_if_unavailable, hub_reachable); cached or reachable
weights are still handed to open_clip.
"""
import socket
import threading
import time

import open_clip
import pytest

from intcoop import backbone
from intcoop.backbone import WeightsUnavailable, hub_reachable, load_clip


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
    monkeypatch.setattr(backbone, "hub_reachable", lambda url, timeout=3.0: probed.append(url) or False)
    monkeypatch.setattr(backbone, "_cached_hub_file", lambda repo, names: None)
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
    monkeypatch.setattr(backbone, "hub_reachable", lambda *a, **k: pytest.fail("probed although offline"))
    monkeypatch.setattr(backbone, "_cached_hub_file", lambda repo, names: None)
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE is set"):
        load_clip("ViT-B-16", pretrained="laion2b_s34b_b88k")


def test_cached_or_reachable_weights_go_to_open_clip(no_download, monkeypatch):
    """Cached: no probe; not cached but reachable: open_clip downloads. Either way open_clip is called."""
    seen = []
    monkeypatch.setattr(backbone, "_cached_hub_file", lambda repo, names: seen.append((repo, names)) or "/x.bin")
    monkeypatch.setattr(backbone, "hub_reachable", lambda *a, **k: pytest.fail("probed although cached"))
    with pytest.raises(WeightsUnavailable) as err:
        load_clip("ViT-B-16", pretrained="openai")
    assert isinstance(err.value.__cause__, OpenClipCalled)
    assert seen == [("timm/vit_base_patch16_clip_224.openai",
                     ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])]
    monkeypatch.setattr(backbone, "_cached_hub_file", lambda repo, names: None)
    monkeypatch.setattr(backbone, "hub_reachable", lambda *a, **k: True)
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
    monkeypatch.setattr(backbone, "hub_reachable", lambda u, timeout=3.0: probed.append(u) or False)
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
    from intcoop.labels import ModelUnavailableError, load_blip2
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probed = []
    monkeypatch.setattr(backbone, "hub_reachable", lambda url, timeout=3.0: probed.append(url) or False)
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
