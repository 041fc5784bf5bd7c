"""An offline end-to-end run on this machine: label (tiny BLIP-2), train and evaluate on a small real-image set.

    intcoop demo --out runs/demo

No weights can be downloaded here, so the demo uses what it can make: a real-image dataset (crops of the photos
that scikit-image and scikit-learn ship, via intcoop.data.demo), a tiny random BLIP-2 saved to a folder (rigged
to answer "bright" for every image: the point is the pipeline, not the labels), and a
ViT-B-16-shaped CLIP with random weights. With real weights, pass a BLIP-2 id and a pretrained CLIP instead.
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


def run_demo(out="runs/demo", *, clip: str = "ViT-B-16", classes: int = 5, shots: int = 16, epochs: int = 10,
             test_per_class: int = 20, progress: bool = True) -> list[dict]:
    """Build the data and the tiny BLIP-2, label, train (cached features) and evaluate; return the result rows."""
    from .config import load_config
    from .data import load_dataset
    from .data.demo import build_demo_dataset
    from .evaluate import evaluate_splits, write_table
    from .labels import label_images
    from .train import Trainer, resolve_config

    out = Path(out)
    root = out / "data"
    if not (root / "SOURCE.txt").is_file():                 # a rerun reuses the data, labels and checkpoints
        build_demo_dataset(root, classes=classes, per_class=shots, val_per_class=2, test_per_class=test_per_class,
                           size=224, source="photos", overwrite=True)
    splits = load_dataset("imagefolder", root)
    print(f"[1/4] data: {len(splits.classnames)} classes, {len(splits.train)} train / {len(splits.test)} test "
          f"real images in {root}")
    blip = build_tiny_blip2(out / "tiny_blip2", always="bright")
    stats = label_images([(it.id, it.path, it.classname) for it in splits.train], out / "labels.jsonl",
                         model=blip, batch_size=16, progress=progress)
    print(f"[2/4] labels: {stats.summary()}")
    cfg = load_config(resolve_config("demo_cpu"), {
        "train.epochs": epochs, "train.out": str(out / "train"), "train.cache_features": True,
        # random CLIP weights: the KgCoOp pull towards a random model's hand-crafted features is meaningless, and
        # the random text tower separates classes weakly, hence no regulariser and a larger learning rate
        "train.lr": 0.1, "train.lambda_reg": 0.0, "train.batch_size": 16, "train.warmup_epochs": 0,
        "data.augment": False, "model.clip": clip, "model.pretrained": None})
    trainer = Trainer(cfg, None, splits.train, splits.classnames, labels=str(out / "labels.jsonl"),
                      progress=progress)               # the model is built from cfg.model (seeded, reloadable)
    metrics = trainer.fit(resume=(out / "train" / "last.pt").is_file())
    model = trainer.model
    print(f"[3/4] trained: {metrics}")
    rows = evaluate_splits(model, splits, "all", "test", progress=progress)
    rows.append({"dataset": splits.name, "subset": "chance", "acc": round(100.0 / len(splits.classnames), 2),
                 "n": rows[0]["n"]})
    csv_path, md_path = write_table(rows, out, "demo_results")
    print(f"[4/4] evaluated ({csv_path}):\n{md_path.read_text()}")
    return rows
