"""A tiny CLIP / SigLIP that really knows shapes and colours, trained in a minute on the CPU.

No CLIP or SigLIP weights can be downloaded here, so the image guard is proven at small scale:
procedurally drawn images (a coloured shape on a textured background, at random sizes and
positions) with captions ("a photo of a red triangle on a striped background"), a word-level
``tokenizer.json`` built with HF ``tokenizers``, and a transformers ``CLIPModel`` /
``SiglipModel`` with 2-layer towers trained with the model's own contrastive loss (CLIP's
softmax, SigLIP's sigmoid). The result is saved like a hub checkpoint (config, weights,
preprocessor config, tokenizer.json), so ``stream-guard model export`` takes it as it would
``google/siglip-base-patch16-224``.

Only tests import this module (it needs the ``export`` extra).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stream_guard.media.decode import TowerInput, preprocess_for_tower

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "TrainReport",
    "caption",
    "draw",
    "save_tokenizer",
    "train_tiny",
    "zero_shot_accuracy",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("plain", "striped", "dotted", "noisy")
_BG_TONES = ((235, 235, 235), (120, 120, 120), (200, 190, 160), (60, 60, 70), (180, 210, 230))
TEMPLATES = (
    "a photo of a {c} {s}",
    "a {c} {s} on a {b} background",
    "a picture of a {c} {s}",
    "a drawing of a {c} {s} on a {b} background",
    "a {c} {s}",
    "a small {c} {s}",
    "a big {c} {s}",
)
SPECIALS = ("[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]")  # CLIP: eos id 2 means legacy pooling
IMAGE_SIZE = 32


def _vocabulary() -> list[str]:
    words = {w for t in TEMPLATES for w in t.replace("{c}", "").replace("{s}", "").split()}
    words |= {w.strip("{}") for w in words}
    words |= set(COLOURS) | set(SHAPES) | set(BACKGROUNDS)
    words |= {"on", "any", "background", "of", "a", "an", "image", "shape", "colour", "with"}
    return list(SPECIALS) + sorted(w for w in words if w and "{" not in w)


def save_tokenizer(out: Path) -> dict[str, int]:
    """A word-level tokenizer.json (lower-cased, [BOS] text [EOS]); returns the special ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {"pad": vocab["[PAD]"], "bos": vocab["[BOS]"], "eos": vocab["[EOS]"], "size": len(vocab)}
    return ids


def _background(rng: np.random.Generator, side: int, kind: str) -> np.ndarray:
    tone = np.array(_BG_TONES[rng.integers(len(_BG_TONES))], np.float32)
    img = np.ones((side, side, 3), np.float32) * tone
    if kind == "striped":
        period = int(rng.integers(4, 12))
        rows = (np.arange(side) // period) % 2 == 0
        mask = rows[:, None] if rng.random() < 0.5 else rows[None, :]
        img = np.where(mask[..., None], img * 0.7, img)
    elif kind == "dotted":
        yy, xx = np.mgrid[0:side, 0:side]
        period = int(rng.integers(6, 14))
        dots = ((yy % period) < 2) & ((xx % period) < 2)
        img[dots] *= 0.55
    elif kind == "noisy":
        img += rng.normal(0, 28, (side, side, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw(
    colour: str, shape: str, background: str, *, seed: int, side: int | None = None
) -> np.ndarray:
    """One uint8 RGB image [side, side, 3] of a ``colour`` ``shape`` on ``background``."""
    rng = np.random.default_rng(seed)
    side = side or int(rng.integers(48, 129))
    im = Image.fromarray(_background(rng, side, background))
    d = ImageDraw.Draw(im)
    r = side * rng.uniform(0.22, 0.36)
    cx, cy = (side * rng.uniform(0.38, 0.62) for _ in range(2))
    rgb = np.array(COLOURS[colour]) + rng.integers(-20, 21, 3)
    fill = tuple(int(v) for v in np.clip(rgb, 0, 255))
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(im, dtype=np.uint8)


def caption(colour: str, shape: str, background: str, rng: np.random.Generator) -> str:
    t = TEMPLATES[rng.integers(len(TEMPLATES))]
    return t.format(c=colour, s=shape, b=background)


@dataclass
class TrainReport:
    kind: str
    steps: int
    seconds: float
    final_loss: float
    zero_shot_accuracy: float


def _dataset(n: int, seed: int, tower: TowerInput):
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    images, labels, bgs = [], [], []
    for i in range(n):
        c, s = classes[i % len(classes)]
        b = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        images.append(preprocess_for_tower(draw(c, s, b, seed=seed * 100_003 + i), tower))
        labels.append((c, s))
        bgs.append(b)
    return np.stack(images), labels, bgs


def _build(kind: str, ids: dict[str, int], seed: int):
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    layers = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(layers, image_size=IMAGE_SIZE, patch_size=8)
    if kind == "clip":
        text = dict(
            layers,
            vocab_size=ids["size"],
            max_position_embeddings=16,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    if kind == "siglip":
        text = dict(
            layers,
            vocab_size=ids["size"],
            max_position_embeddings=16,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # the SigLIP paper's start (t' = log 10), a bias for batches of 20
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-5.0)
        return model
    raise ValueError(f"kind must be clip or siglip, not {kind!r}")


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _tokenise(out: Path, kind: str, texts: list[str]):
    """Token ids as the served text tower will make them: CLIP pads to the longest text with a
    mask, SigLIP pads to its full length and attends to everything (its processor's way)."""
    tok = _load_tokenizer(str(out / "tokenizer.json"))
    pad = tok.token_to_id("[PAD]")
    tok.enable_truncation(16)
    if kind == "siglip":
        tok.enable_padding(pad_id=pad, pad_token="[PAD]", length=16)
    else:
        tok.enable_padding(pad_id=pad, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    if kind == "siglip":
        mask = np.ones_like(mask)
    return ids, mask


def _pixels(images: np.ndarray, kind: str):
    import torch

    from stream_guard.build.export import _DEFAULT_NORM

    mean, std = _DEFAULT_NORM[kind]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _fit(model, out: Path, kind: str, steps: int, batch: int, seed: int, max_seconds: float):
    import torch

    tower = _tower(kind)
    started = time.monotonic()
    images, labels, bgs = _dataset(3000, seed, tower)
    pixels = _pixels(images, kind)
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    done, loss_value = 0, math.nan
    for step in range(1, steps + 1):
        done = step
        pick = _distinct_batch(labels, batch, rng)
        texts = [caption(*labels[i], bgs[i], rng) for i in pick]
        tid, tmask = _tokenise(out, kind, texts)
        result = model(
            input_ids=torch.from_numpy(tid),
            attention_mask=torch.from_numpy(tmask),
            pixel_values=pixels[pick],
            return_loss=True,
        )
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        sched.step()
        loss_value = float(result.loss.detach())
        if time.monotonic() - started > max_seconds:
            break
    model.eval()
    return done, loss_value


def _tower(kind: str) -> TowerInput:
    return TowerInput(IMAGE_SIZE, "squash" if kind == "siglip" else "shortest_edge", 3)


def train_tiny(
    kind: str,
    out: Path,
    *,
    steps: int = 1800,
    batch: int = 20,
    seed: int = 0,
    max_seconds: float = 75.0,
    train: bool = True,
) -> TrainReport:
    """Train (or, with ``train=False``, only initialise) a tiny ``kind`` model and save it to
    ``out`` as a hub-style checkpoint. Training stops at ``steps`` or ``max_seconds``."""
    import torch

    from stream_guard.build.export import _DEFAULT_NORM

    out = Path(out)
    ids = save_tokenizer(out)
    started = time.monotonic()
    threads = torch.get_num_threads()
    # One thread: on a small shared CPU, two threads fighting over tiny matrices run 10x slower.
    torch.set_num_threads(1)
    try:
        model = _build(kind, ids, seed)
        done, loss = _fit(model, out, kind, steps, batch, seed, max_seconds) if train else (0, 0.0)
        acc = zero_shot_accuracy(model.eval(), out, kind, _tower(kind), seed=seed + 7)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    mean, std = _DEFAULT_NORM[kind]
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = {
        "do_resize": True,
        "size": size if kind == "siglip" else {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": kind == "clip",
        "crop_size": size,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "image_processor_type": "CLIPImageProcessor" if kind == "clip" else "SiglipImageProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return TrainReport(kind, done, time.monotonic() - started, loss, acc)


def _distinct_batch(labels, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Indices with each (colour, shape) at most once: no false negatives in the loss."""
    by_class: dict[tuple[str, str], list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    classes = list(by_class)
    chosen = rng.permutation(len(classes))[: min(batch, len(classes))]
    return np.array([rng.choice(by_class[classes[c]]) for c in chosen])


def zero_shot_accuracy(model, out: Path, kind: str, tower: TowerInput, *, seed: int) -> float:
    """Held-out images classified among "a photo of a <colour> <shape>" prompts."""
    import torch

    images, labels, _ = _dataset(200, seed, tower)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    tid, tmask = _tokenise(out, kind, [f"a photo of a {c} {s}" for c, s in classes])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_pixels(images, kind))
        txt = model.get_text_features(
            input_ids=torch.from_numpy(tid), attention_mask=torch.from_numpy(tmask)
        )
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        sims = (
            torch.nn.functional.normalize(img, dim=-1)
            @ torch.nn.functional.normalize(txt, dim=-1).T
        )
    pred = sims.argmax(dim=1).numpy()
    truth = np.array([classes.index(lab) for lab in labels])
    return float((pred == truth).mean())
