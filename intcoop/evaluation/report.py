"""Rendering `explain()` results for people and programs: report.json, report.png and report.html.

    write_report(results, images, out_dir) -> {"json": Path, "png": Path, "html": Path}

- report.json: {"format": FORMAT, "results": results} (the results exactly as explain returned them).
- report.png:  one row per image: the image (as the model saw it: shorter side resized, centre crop), each
               context token's attention map drawn over it as a heat map (alpha blended), and a text panel
               with the top classes, the predicted attribute words and BLIP-2's word. At most MAX_PNG_ROWS rows.
Attention maps share ONE scale per report, relative to uniform attention (1/L over the L = patches + class
token): a patch at or below 1/L is left clear, full colour is the report's largest ratio (at least
MIN_TOP_RATIO x uniform), so near-uniform attention looks uniform; captions and the legend give the numbers.
- report.html: one self-contained page (no external files): per image a heading, its pictures embedded as
               base64 PNG, and tables of top classes and attribute words, BLIP-2's word and notes.
matplotlib draws through its Agg canvas directly (no pyplot, no global backend switch). Files are written
atomically (`config.atomic_write_bytes`).
"""
from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_bytes

__all__ = ["write_report", "display_images", "overlay", "attention_scale", "legend", "FORMAT", "DISPLAY_SIZE",
           "MAX_PNG_ROWS"]

FORMAT = "intcoop-explain-v1"
DISPLAY_SIZE = 224          # pixels of each picture in the report
MAX_PNG_ROWS = 40           # report.png shows the first images only (report.html has all)
ALPHA = 0.6                 # heat-map opacity at the top of the scale
CMAP = "jet"
MIN_TOP_RATIO = 2.0         # full colour at no less than 2x uniform attention (a flat map stays clear)


def attention_scale(results: list[dict]) -> float:
    """The top of the report's colour scale: the largest attention / uniform ratio of any map (>= MIN_TOP_RATIO)."""
    top = MIN_TOP_RATIO
    for r in results:
        att = r.get("attention")
        if att:
            L = att["grid"][0] * att["grid"][1] + 1
            top = max([top] + [v * L for m in att["maps"] for row in m for v in row])
    return top


def legend(results: list[dict]) -> str:
    """What the heat maps show, with the report's scale."""
    att = next((r["attention"] for r in results if r.get("attention")), None)
    if att is None:
        return ""
    L = att["grid"][0] * att["grid"][1] + 1
    return (f"Heat maps: attention of each context token v_j over the patch grid (mean over heads), as a ratio to "
            f"uniform attention 1/L = 1/{L}; one scale for the whole report: clear at or below 1x uniform, full "
            f"colour at {attention_scale(results):.2f}x. Captions: the map's largest ratio and the class token's "
            f"weight.")


# --------------------------------------------------------------------------------------------------- pictures
def display_images(images, size: int = DISPLAY_SIZE) -> list[np.ndarray]:
    """The images as uint8 [size, size, 3] arrays, framed as CLIP's preprocessing frames them.

    Paths / PIL images: shorter side resized, centre crop (so the patch grid lies over the picture as the model
    saw it). A preprocessed tensor [B, 3, H, W]: each image min-max scaled to 0..255 (its normalisation is
    not known here), resized to size x size.
    """
    from PIL import Image

    from ..images import open_all

    opened = open_all(images)
    if isinstance(opened, torch.Tensor):
        x = opened.detach().float().cpu()
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must be [B, 3, H, W], got {tuple(x.shape)}")
        lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
        x = ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).round().clamp(0, 255).to(torch.uint8)
        return [np.asarray(Image.fromarray(a.permute(1, 2, 0).numpy()).resize((size, size), Image.BICUBIC))
                for a in x]
    out = []
    for im in opened:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        out.append(np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)))
    return out


def overlay(picture: np.ndarray, grid_map, alpha: float = ALPHA, cmap: str = CMAP, lo: float | None = None,
            hi: float | None = None) -> np.ndarray:
    """A heat map of grid_map [gh, gw] over picture [S, S, 3] uint8 -> uint8 [S, S, 3].

    The map is upsampled bilinearly to the picture and scaled to 0..1 between lo and hi (default: its own
    minimum and maximum; the report passes one scale for all maps); each pixel is blended with the colour map's
    colour with opacity alpha * (scaled value), so values at or below lo stay as they were.
    """
    import matplotlib
    from PIL import Image

    m = np.asarray(grid_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"an attention map must be [gh, gw], got shape {m.shape}")
    H, W = picture.shape[:2]
    up = np.asarray(Image.fromarray(m).resize((W, H), Image.BILINEAR), dtype=np.float32)
    lo = float(m.min()) if lo is None else float(lo)
    hi = float(m.max()) if hi is None else float(hi)
    up = np.clip((up - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colour = matplotlib.colormaps[cmap](up)[..., :3] * 255.0
    a = (alpha * up)[..., None]
    return np.clip(picture.astype(np.float32) * (1 - a) + colour * a, 0, 255).round().astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _pictures(result: dict, picture: np.ndarray, top: float = MIN_TOP_RATIO) -> list[tuple[str, np.ndarray]]:
    """(caption, picture) for the image and each context token's attention map, drawn as ratios to uniform on
    the report's scale [1, top]."""
    out = [("image", picture)]
    att = result.get("attention")
    if att:
        L = att["grid"][0] * att["grid"][1] + 1
        for name, m, cls in zip(att["context"], att["maps"], att["cls"]):
            ratio = np.asarray(m, dtype=np.float32) * L
            out.append((f"{name}: max {ratio.max():.2f}x uniform (cls {cls:.3f})",
                        overlay(picture, ratio, lo=1.0, hi=top)))
    return out


# ------------------------------------------------------------------------------------------------------ text
def _cut(text: str, width: int, keep_end: bool = False) -> str:
    """text cut to width characters with "..." (at the start when keep_end: a path keeps its file name)."""
    text = str(text)
    if len(text) <= width:
        return text
    return "..." + text[-(width - 3):] if keep_end else text[:width - 3] + "..."


def _attr_text(result: dict, n: int = 5) -> str:
    words = result.get("attributes")
    if not words:
        return "-"
    return ", ".join(f"{w['word']} ({w['cos']:.2f})" for w in words[:n])


def _panel(result: dict, width: int = 44) -> str:
    lines = ["top classes:"]
    for t in result["top"]:
        name = _cut(t["class"], width - 13)
        lines.append(f"  {name:<{width - 12}}{t['prob']:8.3f}")
    lines.append(f"attribute words ({result.get('attribute_mode', '?')}):")
    lines += textwrap.wrap(_attr_text(result), width, initial_indent="  ", subsequent_indent="  ") or ["  -"]
    lines.append(f"BLIP-2: {result['blip2'] if result.get('blip2') else '-'}")
    for note in result.get("notes", []):
        lines += textwrap.wrap(note, width, initial_indent="* ", subsequent_indent="  ")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- PNG
def _render_png(results: list[dict], pictures: list[np.ndarray]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = min(len(results), MAX_PNG_ROWS)
    n_maps = max((len(r["attention"]["maps"]) for r in results[:rows] if r.get("attention")), default=0)
    ratios = [1.0] * (1 + n_maps) + [2.3]
    height = 2.6 * rows + 0.45
    fig = Figure(figsize=(2.3 * sum(ratios), height), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, len(ratios), width_ratios=ratios, wspace=0.08, hspace=0.3,
                            left=0.01, right=0.99, top=1 - 0.25 / height, bottom=0.5 / height)
    top = attention_scale(results)
    for i in range(rows):
        res, pics = results[i], _pictures(results[i], pictures[i], top)
        for j in range(1 + n_maps):
            ax = fig.add_subplot(grid[i, j])
            ax.set_axis_off()
            if j < len(pics):
                caption, arr = pics[j]
                ax.imshow(arr)
                title = _cut(res["image"], 34, keep_end=True) if j == 0 else caption
                ax.set_title(title, fontsize=8)
        ax = fig.add_subplot(grid[i, -1])
        ax.set_axis_off()
        ax.text(0.0, 1.0, _panel(res), va="top", ha="left", family="monospace", fontsize=8.5,
                transform=ax.transAxes)
    footer = legend(results) if n_maps else ""
    if len(results) > rows:
        footer += f"  {len(results) - rows} more image(s) in report.html / report.json."
    fig.text(0.01, 0.004, "\n".join(textwrap.wrap(footer.strip(), 190)), fontsize=8, va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ HTML
_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}section{margin-bottom:2em;border-top:1px solid #ccc}
figure{display:inline-block;margin:0 .4em .4em 0;text-align:center;font-size:.8em}
table.data{border-collapse:collapse;margin:.4em 1.2em .4em 0;display:inline-table;vertical-align:top}
table.data td,table.data th{border:1px solid #ccc;padding:.15em .5em;text-align:left}
td.num{text-align:right;font-family:monospace}.note{color:#855;font-size:.9em}"""


def _table(caption: str, head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    body = "".join("<tr>" + "".join(f"<td{' class=num' if j else ''}>{e(c)}</td>" for j, c in enumerate(r))
                   + "</tr>" for r in rows)
    return (f"<table class=data><caption>{e(caption)}</caption><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in head) + f"</tr>{body}</table>")


def _render_html(results: list[dict], pictures: list[np.ndarray]) -> bytes:
    e = html.escape
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>intcoop explain report</title>",
             f"<style>{_CSS}</style></head><body><h1>intcoop explain report</h1>",
             f"<p>{len(results)} image(s). {html.escape(legend(results))}</p>"]
    top = attention_scale(results)
    for res, picture in zip(results, pictures):
        parts.append(f"<section><h2>{e(str(res['image']))}</h2>")
        for caption, arr in _pictures(res, picture, top):
            data = base64.b64encode(_png(arr)).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(caption)}\" "
                         f"width={arr.shape[1]} height={arr.shape[0]}><figcaption>{e(caption)}</figcaption></figure>")
        parts.append("<div>")
        parts.append(_table("top classes", ["class", "probability"],
                            [[t["class"], f"{t['prob']:.4f}"] for t in res["top"]]))
        words = res.get("attributes") or []
        parts.append(_table(f"attribute words ({res.get('attribute_mode', '?')})", ["word", "cosine"],
                            [[w["word"], f"{w['cos']:.3f}"] for w in words] or [["-", ""]]))
        parts.append(_table("BLIP-2", ["word"], [[res.get("blip2") or "-"]]))
        parts.append("</div>")
        parts += [f"<p class=note>{e(n)}</p>" for n in res.get("notes", [])]
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts).encode("utf-8")


# ----------------------------------------------------------------------------------------------------- entry
def write_report(results: list[dict], images, out_dir) -> dict[str, Path]:
    """Write report.json, report.png and report.html for explain()'s results on `images` (the same inputs, in
    the same order, as given to explain) under out_dir. Returns {"json", "png", "html"} -> Path."""
    pictures = display_images(images)
    if len(pictures) != len(results):
        raise ValueError(f"{len(results)} results for {len(pictures)} images: pass the images given to explain")
    if not results:
        raise ValueError("no results to report")
    out = Path(out_dir)
    paths = {"json": out / "report.json", "png": out / "report.png", "html": out / "report.html"}
    atomic_write_bytes(paths["json"], json.dumps({"format": FORMAT, "results": results}, indent=1).encode())
    atomic_write_bytes(paths["png"], _render_png(results, pictures))
    atomic_write_bytes(paths["html"], _render_html(results, pictures))
    return paths
