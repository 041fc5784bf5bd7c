"""An offline end-to-end run on this machine: label (tiny BLIP-2), train and evaluate on held-out real images.

    intcoop demo --out runs/demo

Data (nothing is downloaded): Fashion-MNIST from Debian's `dataset-fashion-mnist` (intcoop.demo.data), 10
classes; the training shots come from its official train split, the test images from its official test split
(t10k), so no test image is seen in training in any form. Models: no weights can be downloaded here, so the CLIP
has random weights (default `intcoop-tiny`, 32 px; `--clip ViT-B-16` works too, slowly on a CPU) and a tiny
random BLIP-2 saved to a folder answers "bright" for every image (it runs the labelling step; its word carries
no information, so the attribute loss is weighted low). With random weights the frozen towers know nothing:
whatever the prompt learner reaches above chance it learned from the 16 shots per class, and the untrained
prompt's accuracy (0 steps) is printed beside it.

The configuration that runs is written to <out>/train/config.yaml by the trainer (`intcoop train --config
<out>/train/config.yaml --out DIR` reruns it); the results to <out>/demo_results.csv|md.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["build_tiny_blip2", "run_demo", "TINY_VOCAB"]

TINY_VOCAB = ["<pad>", "<unk>", "</s>", "Question:", "Which", "one", "adjective", "best", "describes", "the", "in",
              "this", "image?", "Answer:", "fluffy", "red", "old", "dark", "light", "striped", "plain", "long",
              "short", "soft", "bright", "cat", "a", "is", "."]


def build_tiny_blip2(folder, words=TINY_VOCAB, always: str | None = None, seed: int = 0) -> str:
    """Save a tiny random BLIP-2 (vision 32 px / patch 8, 1-layer Q-Former and OPT) with a word-level tokenizer.

    always: rig the language model to answer this word at every step (its final LayerNorm outputs a constant
    vector b and the tied embedding row of the word is b, so greedy decoding picks it). Returns the folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              PreTrainedTokenizerFast)

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=fast,
                          num_query_tokens=4)
    V = len(proc.tokenizer)  # + the "<image>" token the processor adds
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64),
        text_config=dict(model_type="opt", vocab_size=V, hidden_size=32, word_embed_proj_dim=32,
                         num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, max_position_embeddings=128,
                         bos_token_id=2, eos_token_id=2, pad_token_id=0),
        num_query_tokens=4, image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    net = Blip2ForConditionalGeneration(cfg).eval()
    if always is not None:
        with torch.no_grad():
            ln = net.language_model.model.decoder.final_layer_norm
            ln.weight.zero_()
            ln.bias.fill_(1.0)
            net.language_model.get_input_embeddings().weight[list(words).index(always)] = 1.0
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


# The demo's recipe (measured on this CPU, see README): cached image features, no augmentation, no KgCoOp
# regulariser (pulling towards a random CLIP's hand-crafted prompt means nothing), a large learning rate (a random
# text tower passes small gradients), the uninformative BLIP-2 word weighted low.
DEMO_RECIPE = {"train.cache_features": True, "data.augment": False, "train.lambda_reg": 0.0, "train.lambda_attr": 0.1,
               "train.warmup_epochs": 0, "train.weight_decay": 0.0, "data.workers": 0, "data.subsample": "all",
               "data.dataset": "imagefolder", "model.pretrained": None, "train.log_every": 5}
DEMO_DEFAULTS = dict(clip="intcoop-tiny", classes=10, shots=16, test_per_class=50, epochs=30, lr=0.15, batch_size=16)


def demo_config(out, *, clip: str, shots: int, epochs: int, lr: float, batch_size: int, seed: int = 1):
    """The RunConfig the demo trains with: demo_cpu.yaml, DEMO_RECIPE, and the run's own data, labels and sizes."""
    from ..config import load_config, resolve_config

    out = Path(out).resolve()
    return load_config(resolve_config("demo_cpu"), {
        **DEMO_RECIPE, "model.clip": clip, "data.root": str(out / "data"), "data.shots": shots,
        "data.labels": str(out / "labels.jsonl"), "train.epochs": epochs, "train.lr": lr,
        "train.batch_size": batch_size, "train.seed": seed, "train.out": str(out / "train")})


def run_demo(out="runs/demo", *, clip: str = DEMO_DEFAULTS["clip"], classes: int = DEMO_DEFAULTS["classes"],
             shots: int = DEMO_DEFAULTS["shots"], epochs: int = DEMO_DEFAULTS["epochs"],
             test_per_class: int = DEMO_DEFAULTS["test_per_class"], lr: float = DEMO_DEFAULTS["lr"],
             batch_size: int = DEMO_DEFAULTS["batch_size"], progress: bool = True, log=print) -> list[dict]:
    """Build the data and the tiny BLIP-2, label, train (cached features) and evaluate on the held-out test split;
    return the result rows (chance, untrained prompt, trained prompt). A rerun reuses data, labels and checkpoint.
    """
    import time

    from .._io import write_table
    from ..attributes.blip2 import label_images
    from ..clip import TINY_CLIP, register_tiny_clip
    from ..data import load_dataset
    from ..evaluation.metrics import evaluate_splits
    from ..train.inputs import build_model
    from ..train.trainer import Trainer
    from .data import build_demo_dataset

    for name, v in (("classes", classes), ("shots", shots), ("epochs", epochs), ("test_per_class", test_per_class)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if clip == TINY_CLIP:
        register_tiny_clip()
    try:                                                    # transformers' bars for saving / loading the tiny
        from transformers.utils import logging as hf_logging   # BLIP-2 say nothing a person needs here
        hf_logging.disable_progress_bar()
    except ImportError:                                     # pragma: no cover - label_images needs transformers
        pass
    cfg = demo_config(out, clip=clip, shots=shots, epochs=epochs, lr=lr, batch_size=batch_size)
    out, root = Path(out), Path(cfg.data.root)
    if not (root / "SOURCE.txt").is_file():                 # a rerun reuses the data, labels and checkpoints
        build_demo_dataset(root, classes=classes, per_class=shots, val_per_class=2, test_per_class=test_per_class,
                           size=64 if clip == TINY_CLIP else 224, source="fashion_mnist", overwrite=True)
    splits = load_dataset("imagefolder", root)
    blip = build_tiny_blip2(out / "tiny_blip2", always="bright")
    stats = label_images([(it.id, it.path, it.classname) for it in splits.train], cfg.data.labels,
                         model=blip, batch_size=16, progress=progress)
    start = time.perf_counter()
    trainer = Trainer(cfg, progress=progress)               # reads data.root / shots / labels: config.yaml is the run
    metrics = trainer.fit(resume=(Path(cfg.train.out) / "last.pt").is_file())
    seconds = time.perf_counter() - start
    untrained = evaluate_splits(build_model(trainer.config.model), splits, "all", "test", progress=progress)[0]
    trained = evaluate_splits(trainer.model, splits, "all", "test", progress=progress)[0]
    n = trained["n"]
    rows = [{"model": "chance (1 / classes)", "acc": round(100.0 / len(splits.classnames), 2), "n": n},
            {"model": "untrained prompt (0 steps)", "acc": untrained["acc"], "n": n},
            {"model": f"trained prompt ({trainer.step} steps)", "acc": trained["acc"], "n": n}]
    csv_path, md_path = write_table(rows, out, "demo_results")
    log(demo_summary(splits, stats, trainer, metrics, seconds, rows, (csv_path, md_path)))
    return rows


def _shown(path) -> str:
    """A path as a person reads it: relative to the working directory when under it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def demo_summary(splits, stats, trainer, metrics, seconds, rows, files) -> str:
    """The demo's report: what was trained and tested on, the training, the accuracy table, the files."""
    from .._io import table

    cfg = trainer.config
    run = Path(_shown(cfg.train.out))
    per = {s: len(getattr(splits, s)) // len(splits.classnames) for s in ("train", "test")}
    lines = [
        f"intcoop demo: CLIP {cfg.model.clip} with random weights, IntCoOp prompt ({cfg.model.conditioning} "
        f"conditioning, attributes {cfg.model.attributes}), on the CPU",
        f"  data     Fashion-MNIST, {len(splits.classnames)} classes: train {len(splits.train)} images ({per['train']}"
        f" per class, official train split), test {len(splits.test)} ({per['test']} per class, official test "
        f"split, never seen in training)",
        f"  labels   {stats.total} images ({stats.labelled} newly labelled, {stats.reused} reused) by "
        f"the tiny random BLIP-2 (always 'bright') -> {_shown(cfg.data.labels)}",
        f"  train    {cfg.train.epochs} epochs, {trainer.step} steps, lr {cfg.train.lr:g}, {seconds:.1f} s; final loss "
        f"{metrics.get('loss', float('nan')):.3f}, train accuracy {100 * metrics.get('acc', float('nan')):.1f} %",
        "", table([[r["model"], f"{r['acc']:.1f} %", r["n"]] for r in rows], ["model", "test accuracy", "images"],
                  right={1, 2}), "",
        f"  results  {_shown(files[1])} (also .csv)",
        f"  config   {run / 'config.yaml'} (rerun: intcoop train --config {run / 'config.yaml'} --out DIR)",
        f"  model    {run / 'last.pt'}"]
    return "\n".join(lines)
