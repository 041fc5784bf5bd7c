"""A package that answers at once: `intcoop --help`, every `intcoop <cmd> --help`, `import intcoop.ops` and
`import intcoop.kernels` import none of open_clip, transformers, timm, matplotlib (its time against `import
torch` is a bench: benches/bench_startup.py); repeated `encode_prompts` calls without a tokenizer re-use one
tokenizer and its class-suffix cache.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HEAVY = ("open_clip", "transformers", "timm", "matplotlib")
REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import intcoop.ops, intcoop.kernels
after_imports = sorted(m for m in {heavy!r} if m in sys.modules)
from intcoop.cli import build_parser, main
sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
seen = {{}}
for argv in [["--help"]] + [[c, "--help"] for c in sub.choices]:
    try:
        main(argv)
    except SystemExit:
        pass
    seen[" ".join(argv)] = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"imports": after_imports, "help": seen, "commands": sorted(sub.choices)}}), file=sys.stderr)
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_help_and_op_imports_load_no_heavy_package():
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY)], capture_output=True, text=True,
                          env=_env(), timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stderr.strip().splitlines()[-1])
    assert {"train", "eval", "explain", "info"} <= set(out["commands"])
    assert out["imports"] == [], f"import intcoop.ops / intcoop.kernels load {out['imports']}"
    bad = {cmd: mods for cmd, mods in out["help"].items() if mods}
    assert not bad, f"help loads heavy packages: {bad}"


def test_encode_prompts_without_tokenizer_reuses_one_tokenizer(clip_tiny, monkeypatch):
    """No tokenizer argument: one cached CLIP BPE tokenizer, no new one built and no re-tokenisation per call."""
    import open_clip

    from intcoop import text
    from intcoop.clip import _tokenizer_for, default_tokenizer, load_clip, tokenizer_for_name
    from intcoop.inference import _clip_tokenizer

    built = []
    real_init = open_clip.SimpleTokenizer.__init__

    def counting(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)

    default_tokenizer()                                          # the one instance (built at most once per process)
    monkeypatch.setattr(open_clip.SimpleTokenizer, "__init__", counting)
    raw = clip_tiny.model                                        # a bare open_clip model: no tokenizer with it
    prefix = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    names = ["cat", "dog", "sea lion", "golden retriever", "x", "tabby cat", "ox"]
    first = text.encode_prompts(raw, prefix, names)
    info = text._suffix_tokens.cache_info()
    for _ in range(3):
        again = text.encode_prompts(raw, prefix, names)
    after = text._suffix_tokens.cache_info()
    assert built == [], f"{len(built)} tokenizer(s) built by encode_prompts"
    assert after.misses == info.misses and after.hits == info.hits + 3     # tokenised once, then cache hits
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert _tokenizer_for(raw, None) is default_tokenizer() is _clip_tokenizer()
    assert load_clip(raw).tokenizer is load_clip(raw).tokenizer is default_tokenizer()
    assert built == []
    named = tokenizer_for_name("ViT-B-16")                       # one per model name: built on first use only
    n = len(built)
    assert tokenizer_for_name("ViT-B-16") is named and len(built) == n <= 1
