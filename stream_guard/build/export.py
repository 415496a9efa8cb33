"""Export a Hugging Face image-text dual encoder (CLIP, SigLIP) to two ONNX towers.

``stream-guard model export HF_ID_OR_DIR --out DIR`` loads ``CLIPModel`` / ``SiglipModel`` and
its processor config (a hub id or a local directory; the same loading code either way), and writes

* ``image_encoder.onnx``: ``IMAGE`` uint8 ``[batch, S, S, 3]`` (RGB, already resized / cropped
  to the model's input size) -> ``EMBEDDING`` float32 ``[batch, D]``, L2-normalised. The
  processor's rescale and mean/std normalisation are part of the graph, so a worker sends the
  same cheap uint8 tensor it sends the detector;
* ``text_encoder.onnx``: ``INPUT_IDS`` / ``ATTENTION_MASK`` int64 ``[batch, seq]`` ->
  ``EMBEDDING`` float32 ``[batch, D]``, L2-normalised;

with a dynamic batch axis (and sequence axis), then runs both through onnxruntime and PyTorch on
random inputs at a batch size and sequence length different from the traced ones and reports the
maximum absolute error of the embeddings and of the image-text scores (CLIP: scaled cosine
logits; SigLIP: the same plus its bias). The tensor names are the Triton tensor names, so the GPU
flavour (``onnxruntime_onnx``) serves the files unchanged and the CPU flavour serves them with
``onnx_runner.py``.

Needs the ``export`` extra (torch, transformers); nothing on the serving path imports this module.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import string
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_guard.errors import ConfigError

__all__ = [
    "ExportReport",
    "Exporter",
    "IMAGE_FILE",
    "Kind",
    "OPSET",
    "Preprocessing",
    "REPORT_FILE",
    "TEXT_FILE",
    "detect_kind",
    "export_dual_encoder",
    "load_dual_encoder",
    "load_preprocessing",
    "pixel_values",
    "random_inputs",
    "save_tiny_checkpoint",
    "scores",
    "torch_reference",
    "EXPORT_PARAMETER",
    "embedder_config",
    "export_parameter",
    "save_tokenizer",
    "tokenizer_config",
    "tower_config",
    "verify_export",
    "write_towers",
]

log = logging.getLogger(__name__)

Kind = Literal["auto", "clip", "siglip"]
Exporter = Literal["auto", "dynamo", "torchscript"]
OPSET = 17
IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
REPORT_FILE = "export.json"
# Defaults of the two families' processors, used only when a checkpoint ships no processor config.
_DEFAULT_NORM = {
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}
_DEFAULT_TEXT_LENGTH = {"clip": 77, "siglip": 64}


@dataclass(frozen=True)
class Preprocessing:
    """What the image processor does after resizing, baked into the image graph."""

    image_size: int
    rescale_factor: float
    image_mean: list[float]
    image_std: list[float]
    # How the processor resizes before that (the worker does it: media.decode.TowerInput):
    # "shortest_edge" + centre crop (CLIP) or "squash" straight to the size (SigLIP).
    resize: str = "squash"
    resample: int = 3  # PIL filter number, as processor configs write it (3: bicubic)


@dataclass
class ExportReport:
    kind: str
    source: str
    embed_dim: int
    image_size: int
    max_text_length: int
    vocab_size: int
    logit_scale: float  # exp(logit_scale) already applied
    logit_bias: float  # SigLIP only; 0 for CLIP
    opset: int
    exporter: str
    image_onnx: str
    text_onnx: str
    tokenizer: str | None = None
    max_abs_error: dict[str, float] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # How the text tower wants its token ids (the served tokenizer model applies it): CLIP pads
    # to the longest text and masks the padding; SigLIP was trained on texts padded to its full
    # length with no mask (its processor passes none), so it pads to max_length and attends all.
    text_padding: str = "longest"
    pad_token_id: int = 0
    text_attention: str = "mask"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- loading ---------------------------------------------------------------------------------


def _torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "exporting needs the `export` extra: pip install -e '.[export]' "
            "(torch==2.13.0 and transformers)"
        ) from e
    return torch


def _cached(src: str, filename: str) -> Path | None:
    """``filename`` of a local directory or a hub repository, or None when it has none."""
    local = Path(src)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from transformers.utils import cached_file

    path = cached_file(src, filename, _raise_exceptions_for_missing_entries=False)
    return Path(path) if path else None


def detect_kind(src: str, kind: Kind = "auto") -> str:
    from transformers import AutoConfig

    if kind != "auto":
        return kind
    model_type = AutoConfig.from_pretrained(src).model_type
    if model_type in ("clip", "siglip"):
        return model_type
    raise ConfigError(
        f"{src}: model_type {model_type!r} is not an image-text dual encoder this exporter "
        "knows (clip, siglip); pass --kind to force one"
    )


def load_dual_encoder(src: str, kind: Kind = "auto"):
    """(model in eval mode with eager attention, kind) for a hub id or a local directory."""
    _torch()
    from transformers import CLIPModel, SiglipModel

    kind = detect_kind(src, kind)
    cls = CLIPModel if kind == "clip" else SiglipModel
    # Eager attention: it traces to plain MatMul/Softmax; the SDPA path's mask helpers do not
    # export with the TorchScript exporter, and the numbers are the same.
    model = cls.from_pretrained(src, attn_implementation="eager")
    return model.eval(), kind


def load_preprocessing(src: str, model, kind: str) -> Preprocessing:
    image_size = int(model.config.vision_config.image_size)
    mean, std = _DEFAULT_NORM[kind]
    rescale = 1.0 / 255.0
    path = _cached(src, "preprocessor_config.json")
    if path is None:
        log.warning("%s has no preprocessor_config.json; using %s defaults", src, kind)
        return Preprocessing(image_size, rescale, list(mean), list(std))
    cfg = json.loads(path.read_text())
    if cfg.get("do_rescale", True):
        rescale = float(cfg.get("rescale_factor", rescale))
    else:
        rescale = 1.0
    if cfg.get("do_normalize", True):
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    size = crop or cfg.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    if side and int(side) != image_size:
        raise ConfigError(
            f"{src}: processor output {side}px differs from the vision tower's {image_size}px"
        )
    resized = cfg.get("size") or {}
    shortest = isinstance(resized, dict) and "shortest_edge" in resized
    return Preprocessing(
        image_size,
        rescale,
        [float(m) for m in mean],
        [float(s) for s in std],
        resize="shortest_edge" if shortest or crop else "squash",
        resample=int(cfg.get("resample", 3)),
    )


# -- the towers as modules --------------------------------------------------------------------


def _features(out):
    """transformers 4 returns the projected features; 5 returns them as ``pooler_output``."""
    return out if hasattr(out, "dim") else out.pooler_output


def _towers(model, prep: Preprocessing):
    torch = _torch()
    nn = torch.nn

    class ImageTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(prep.image_mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(prep.image_std).view(1, 3, 1, 1))

        def forward(self, image):  # uint8 [B, S, S, 3]
            x = image.permute(0, 3, 1, 2).float() * prep.rescale_factor
            x = (x - self.mean) / self.std
            emb = _features(self.model.get_image_features(pixel_values=x))
            return emb / emb.norm(p=2, dim=-1, keepdim=True)

    class TextTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            emb = _features(out)
            return emb / emb.norm(p=2, dim=-1, keepdim=True)

    return ImageTower().eval(), TextTower().eval()


def pixel_values(images: np.ndarray, prep: Preprocessing):
    """What the processor hands the model for uint8 NHWC images already at the input size."""
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = x * prep.rescale_factor
    mean = torch.tensor(prep.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


# -- the tokenizer the served text tower uses ---------------------------------------------------

# SigLIP's tokenizer lower-cases and strips punctuation before SentencePiece
# (SiglipTokenizer.canonicalize_text); a converted tokenizer.json must do the same.
_CHECK_TEXTS = (
    "a photo of a cat",
    "A Photo Of A RED triangle, on any background!",
    "someone pointing a gun at a person",
    "  extra   spaces\tand\ttabs  ",
    "numbers 1234 and symbols #@%",
)


def save_tokenizer(src: str, out: Path, kind: str) -> str | None:
    """Write ``tokenizer.json`` for the served text tower: the checkpoint's own, or its slow
    (SentencePiece) tokenizer converted and checked token for token on sample texts. Returns
    the file name, or None when the checkpoint has no tokenizer at all."""
    own = _cached(src, "tokenizer.json")
    if own is not None:
        shutil.copy(own, out / "tokenizer.json")
        return "tokenizer.json"
    files = ("tokenizer_config.json", "spiece.model", "vocab.json", "sentencepiece.bpe.model")
    if not any(_cached(src, f) is not None for f in files):
        # transformers 5 builds an empty tokenizer from nothing: only convert a real one.
        log.warning("%s ships no tokenizer: the text tower is exported without one", src)
        return None
    try:
        from transformers import AutoTokenizer

        slow = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, ImportError) as e:
        log.warning("%s has no tokenizer.json and no loadable tokenizer (%s)", src, e)
        return None
    backend = getattr(slow, "backend_tokenizer", None)
    if backend is None:
        backend = _convert(slow, kind)
    _check_conversion(slow, backend, kind)
    backend.save(str(out / "tokenizer.json"))
    return "tokenizer.json"


def _convert(slow, kind: str):
    from tokenizers import Regex, normalizers
    from transformers.convert_slow_tokenizer import SpmConverter, convert_slow_tokenizer

    try:
        backend = convert_slow_tokenizer(slow)
    except (ValueError, KeyError):
        if kind != "siglip":
            raise
        backend = SpmConverter(slow).converted()  # SigLIP's vocabulary is T5's SentencePiece
    if kind == "siglip":  # SiglipTokenizer.canonicalize_text, then SentencePiece's own
        punctuation = "[" + re.escape(string.punctuation) + "]"
        steps = [
            normalizers.Lowercase(),
            normalizers.Replace(Regex(punctuation), ""),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
        if backend.normalizer is not None:
            steps.append(backend.normalizer)
        backend.normalizer = normalizers.Sequence(steps)
    return backend


def _check_conversion(slow, backend, kind: str) -> None:
    for text in _CHECK_TEXTS:
        want = slow(text, add_special_tokens=True)["input_ids"]
        got = backend.encode(text).ids
        if list(want) != list(got):
            raise ConfigError(
                f"the converted {kind} tokenizer differs from the checkpoint's on {text!r} "
                f"({got} != {want}); export a tokenizer.json with the checkpoint instead"
            )


def _pad_token_id(src: str, tokenizer: Path | None, model) -> int:
    """The checkpoint's pad token: its tokenizer_config's, else tokenizer.json's padding, else
    the text config's (CLIP masks padding, so only SigLIP's choice changes embeddings)."""
    if tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        config = _cached(src, "tokenizer_config.json")
        pad = json.loads(config.read_text()).get("pad_token") if config else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str) and tok.token_to_id(pad) is not None:
            return int(tok.token_to_id(pad))
        if tok.padding and "pad_id" in tok.padding:
            return int(tok.padding["pad_id"])
    pad_id = getattr(model.config.text_config, "pad_token_id", None)
    return int(pad_id) if pad_id is not None else 0


# -- export ------------------------------------------------------------------------------------


def _use_dynamo(exporter: Exporter) -> bool:
    if exporter != "auto":
        return exporter == "dynamo"
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False  # the dynamo exporter needs onnxscript; the TorchScript one does not
    return True


def _export(module, args: tuple, path: Path, names_in: list[str], dynamic: dict, dynamo: bool):
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(
        input_names=names_in, output_names=["EMBEDDING"], opset_version=OPSET, dynamo=dynamo
    )
    if dynamo:
        dim = torch.export.Dim
        batch = dim("batch", min=1, max=4096)
        shapes = {}
        for name, axes in dynamic.items():
            shapes[name] = {
                a: (batch if a == 0 else dim(f"{name}_{a}", min=2, max=4096)) for a in axes
            }
        kwargs["dynamic_shapes"] = shapes
        kwargs["external_data"] = False
    else:
        kwargs["dynamic_axes"] = {**dynamic, "EMBEDDING": {0: "batch"}}
        kwargs["do_constant_folding"] = True
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on shapes inside transformers (size checks that
        # hold for every input); verify_export runs other batch sizes and lengths to prove it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(module, args, str(path), **kwargs)
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return path


def export_dual_encoder(
    src: str | Path,
    out: Path,
    *,
    kind: Kind = "auto",
    exporter: Exporter = "auto",
    verify: bool = True,
    seed: int = 0,
) -> ExportReport:
    """Export both towers of ``src`` into ``out`` and (by default) verify them against PyTorch."""
    torch = _torch()
    src = str(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, kind = load_dual_encoder(src, kind)
    prep = load_preprocessing(src, model, kind)
    image_tower, text_tower = _towers(model, prep)
    dynamo = _use_dynamo(exporter)
    s = prep.image_size
    cfg = model.config
    vocab = int(cfg.text_config.vocab_size)
    max_len = int(cfg.text_config.max_position_embeddings)
    # Traced at batch 2 / length 5; verified at other sizes to prove the axes really are dynamic.
    image_args = (torch.zeros((2, s, s, 3), dtype=torch.uint8),)
    ids = torch.ones((2, min(5, max_len)), dtype=torch.int64)
    text_args = (ids, torch.ones_like(ids))
    _export(image_tower, image_args, out / IMAGE_FILE, ["IMAGE"], {"IMAGE": {0: "batch"}}, dynamo)
    _export(
        text_tower,
        text_args,
        out / TEXT_FILE,
        ["INPUT_IDS", "ATTENTION_MASK"],
        {"INPUT_IDS": {0: "batch", 1: "sequence"}, "ATTENTION_MASK": {0: "batch", 1: "sequence"}},
        dynamo,
    )
    tokenizer = save_tokenizer(src, out, kind)
    with torch.no_grad():
        embed_dim = int(text_tower(*text_args).shape[-1])
        scale = float(model.logit_scale.exp())
        bias = float(model.logit_bias) if getattr(model, "logit_bias", None) is not None else 0.0
    report = ExportReport(
        kind=kind,
        source=src,
        embed_dim=embed_dim,
        image_size=s,
        max_text_length=min(max_len, _DEFAULT_TEXT_LENGTH[kind]),
        vocab_size=vocab,
        logit_scale=scale,
        logit_bias=bias,
        opset=OPSET,
        exporter="dynamo" if dynamo else "torchscript",
        image_onnx=IMAGE_FILE,
        text_onnx=TEXT_FILE,
        tokenizer=tokenizer,
        preprocessing=asdict(prep),
        text_padding="max_length" if kind == "siglip" else "longest",
        pad_token_id=_pad_token_id(src, out / tokenizer if tokenizer else None, model),
        text_attention="ones" if kind == "siglip" else "mask",
    )
    if verify:
        report.max_abs_error = verify_export(model, prep, out, report, seed=seed)
    (out / REPORT_FILE).write_text(report.to_json())
    return report


def random_inputs(report: ExportReport, *, batch: int = 3, seq: int = 9, seed: int = 0):
    """uint8 images and right-padded token ids, every row a different length."""
    rng = np.random.default_rng(seed)
    s = report.image_size
    images = rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
    seq = max(2, min(seq, report.max_text_length))
    ids = rng.integers(0, report.vocab_size, (batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for row in range(batch):
        mask[row, : max(2, seq - row)] = 1
    ids = np.where(mask > 0, ids, 0)
    return images, ids, mask


def scores(report: ExportReport, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Image-text logits [images, texts] from normalised embeddings, as the model computes them."""
    return report.logit_scale * image_emb @ text_emb.T + report.logit_bias


def torch_reference(model, prep: Preprocessing, images, ids, mask) -> dict[str, np.ndarray]:
    """PyTorch's own outputs (the full model's forward, not the export wrappers)."""
    torch = _torch()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=pixel_values(images, prep),
        )
    return {
        "image": out.image_embeds.numpy(),
        "text": out.text_embeds.numpy(),
        "scores": out.logits_per_image.numpy(),
    }


def verify_export(model, prep: Preprocessing, out: Path, report: ExportReport, *, seed: int = 0):
    import onnxruntime as ort

    images, ids, mask = random_inputs(report, seed=seed)
    ref = torch_reference(model, prep, images, ids, mask)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    img = ort.InferenceSession(str(out / IMAGE_FILE), opts, providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / TEXT_FILE), opts, providers=["CPUExecutionProvider"])
    (image_emb,) = img.run(["EMBEDDING"], {"IMAGE": images})
    (text_emb,) = txt.run(["EMBEDDING"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    return {
        "image_embedding": float(np.abs(image_emb - ref["image"]).max()),
        "text_embedding": float(np.abs(text_emb - ref["text"]).max()),
        "scores": float(np.abs(scores(report, image_emb, text_emb) - ref["scores"]).max()),
    }


# -- into a model repository -----------------------------------------------------------------


def _queue_policy(max_queue: int) -> str:
    return (
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        "    default_timeout_microseconds: 10000000\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {max_queue}\n"
        "  }\n"
    )


def tower_config(
    name: str,
    tower: Literal["image", "text"],
    report: ExportReport,
    *,
    flavour: str = "cpu",
    max_batch_size: int = 32,
    parameters: str = "",
) -> str:
    """config.pbtxt of one exported tower; cpu and gpu differ only in backend and instance kind.
    ``parameters``: extra ``parameters {...}`` lines (the export description, see write_towers)."""
    if tower == "image":
        s = report.image_size
        inputs = f'  {{ name: "IMAGE", data_type: TYPE_UINT8, dims: [ {s}, {s}, 3 ] }}'
    else:
        inputs = (
            '  { name: "INPUT_IDS", data_type: TYPE_INT64, dims: [ -1 ] },\n'
            '  { name: "ATTENTION_MASK", data_type: TYPE_INT64, dims: [ -1 ] }'
        )
    if flavour == "cpu":
        runtime = 'backend: "python"'
        extra = 'parameters { key: "intra_op_threads" value: { string_value: "2" } }\n'
        kind = "KIND_CPU"
    elif flavour == "gpu":
        runtime = 'platform: "onnxruntime_onnx"'
        extra = ""
        kind = "KIND_GPU"
    else:
        raise ValueError(f"unknown flavour {flavour!r} (cpu, gpu)")
    return (
        f"# {report.kind} {tower} tower exported from {report.source}"
        " by `stream-guard model export`\n"
        f'name: "{name}"\n'
        f"{runtime}\n"
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f'output [{{ name: "EMBEDDING", data_type: TYPE_FP32, dims: [ {report.embed_dim} ] }}]\n'
        "dynamic_batching {\n"
        "  max_queue_delay_microseconds: 3000\n"
        f"{_queue_policy(512)}"
        "}\n"
        f"instance_group [{{ kind: {kind}, count: 1 }}]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f"{extra}"
        f"{parameters}"
    )


EXPORT_PARAMETER = "stream_guard.export"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_parameter(report: ExportReport, tower: str, digest: str) -> str:
    """The export described in a Triton config parameter, so a worker reads the preprocessing,
    temperature and identity of a served tower from Triton alone (no shared files)."""
    prep = report.preprocessing or {}
    info = {
        "tower": tower,
        "kind": report.kind,
        "source": report.source,
        "embed_dim": report.embed_dim,
        "image_size": report.image_size,
        "resize": prep.get("resize", "squash"),
        "resample": prep.get("resample", 3),
        "logit_scale": report.logit_scale,
        "logit_bias": report.logit_bias,
        "max_text_length": report.max_text_length,
        "sha256": digest,
    }
    value = json.dumps(info, separators=(",", ":")).replace("\\", "\\\\").replace('"', '\\"')
    return f'parameters {{ key: "{EXPORT_PARAMETER}" value: {{ string_value: "{value}" }} }}\n'


def _queue(max_queue: int) -> str:
    return (
        "dynamic_batching {\n  max_queue_delay_microseconds: 3000\n"
        + _queue_policy(max_queue)
        + "}\n"
    )


def tokenizer_config(name: str, report: ExportReport, *, max_batch_size: int = 32) -> str:
    """The dual text tower's tokenizer (Python, CPU in both flavours): TEXT -> token ids with
    the padding the model was trained with (see ExportReport.text_padding)."""
    params = {
        "max_length": report.max_text_length,
        "padding": report.text_padding,
        "pad_id": report.pad_token_id,
        "attention": report.text_attention,
    }
    lines = "".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items()
    )
    return (
        f"# tokenizer of the {report.kind} text tower exported from {report.source}\n"
        f'name: "{name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {max_batch_size}\n"
        'input [{ name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] }]\n'
        "output [\n"
        '  { name: "INPUT_IDS", data_type: TYPE_INT64, dims: [ -1 ] },\n'
        '  { name: "ATTENTION_MASK", data_type: TYPE_INT64, dims: [ -1 ] }\n'
        "]\n"
        f"{_queue(1024)}"
        "instance_group [{ kind: KIND_CPU, count: 1 }]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f"{lines}"
    )


def embedder_config(
    name: str, tokenizer: str, encoder: str, report: ExportReport, parameters: str = ""
) -> str:
    """``<prefix>_text_embedder``: TEXT -> EMBEDDING through the tokenizer and the text tower,
    the interface of the MiniLM ``text_encoder`` (the worker sends strings, never token ids)."""
    return (
        f"# {report.kind} text tower on raw text: {tokenizer} -> {encoder}\n"
        f'name: "{name}"\n'
        'platform: "ensemble"\n'
        "max_batch_size: 32\n"  # at most its steps' (the towers serve batches of 32)
        'input [{ name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] }]\n'
        f'output [{{ name: "EMBEDDING", data_type: TYPE_FP32, dims: [ {report.embed_dim} ] }}]\n'
        "ensemble_scheduling {\n  step [\n"
        f'    {{ model_name: "{tokenizer}" model_version: -1\n'
        '      input_map { key: "TEXT" value: "TEXT" }\n'
        '      output_map { key: "INPUT_IDS" value: "ids" }\n'
        '      output_map { key: "ATTENTION_MASK" value: "mask" } },\n'
        f'    {{ model_name: "{encoder}" model_version: -1\n'
        '      input_map { key: "INPUT_IDS" value: "ids" }\n'
        '      input_map { key: "ATTENTION_MASK" value: "mask" }\n'
        '      output_map { key: "EMBEDDING" value: "EMBEDDING" } }\n'
        "  ]\n}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        f"{parameters}"
    )


def write_towers(
    export_dir: Path, repo: Path, *, prefix: str | None = None, flavour: str = "cpu"
) -> dict[str, str]:
    """Add the exported towers to a model repository as ``<prefix>_image_encoder`` and
    ``<prefix>_text_encoder`` (prefix defaults to the model kind), plus, when the export has a
    tokenizer, ``<prefix>_text_tokenizer`` and the raw-text tower ``<prefix>_text_embedder``.
    Returns role -> model name (``image``, ``text``, ``text_tokenizer``, ``text_embedder``)."""
    from stream_guard.build.repository import TEMPLATES

    export_dir, repo = Path(export_dir), Path(repo)
    report = ExportReport(**json.loads((export_dir / REPORT_FILE).read_text()))
    prefix = prefix or report.kind
    digests = {
        "image": _sha256(export_dir / report.image_onnx),
        "text": _sha256(export_dir / report.text_onnx),
    }
    if report.tokenizer:  # the tokenizer is part of what the text tower means
        digests["text"] = _sha256_text(digests["text"] + _sha256(export_dir / report.tokenizer))
    names = {}
    for tower, filename in (("image", report.image_onnx), ("text", report.text_onnx)):
        name = f"{prefix}_{tower}_encoder"
        version = repo / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        param = export_parameter(report, tower, digests[tower])
        (repo / name / "config.pbtxt").write_text(
            tower_config(name, tower, report, flavour=flavour, parameters=param)  # type: ignore[arg-type]
        )
        shutil.copy(export_dir / filename, version / "model.onnx")
        if flavour == "cpu":
            shutil.copy(TEMPLATES / "cpu" / "onnx_runner.py", version / "model.py")
        if tower == "text" and report.tokenizer:
            shutil.copy(export_dir / report.tokenizer, version / "tokenizer.json")
        shutil.copy(export_dir / REPORT_FILE, version / REPORT_FILE)
        names[tower] = name
    if report.tokenizer:
        names.update(_write_text_embedder(export_dir, repo, report, prefix, digests["text"]))
    return names


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _write_text_embedder(
    export_dir: Path, repo: Path, report: ExportReport, prefix: str, digest: str
) -> dict[str, str]:
    from stream_guard.build.repository import TEMPLATES

    tokenizer, embedder = f"{prefix}_text_tokenizer", f"{prefix}_text_embedder"
    (repo / tokenizer / "1").mkdir(parents=True, exist_ok=True)
    (repo / tokenizer / "config.pbtxt").write_text(tokenizer_config(tokenizer, report))
    template = TEMPLATES / "cpu" / "dual_text_tokenizer" / "1" / "model.py"
    shutil.copy(template, repo / tokenizer / "1" / "model.py")
    shutil.copy(export_dir / str(report.tokenizer), repo / tokenizer / "1" / "tokenizer.json")
    (repo / embedder / "1").mkdir(parents=True, exist_ok=True)  # an ensemble needs one too
    param = export_parameter(report, "text", digest)
    (repo / embedder / "config.pbtxt").write_text(
        embedder_config(embedder, tokenizer, f"{prefix}_text_encoder", report, param)
    )
    return {"text_tokenizer": tokenizer, "text_embedder": embedder}


# -- tiny checkpoints (tests and smoke runs; no hub here) ------------------------------------


def save_tiny_checkpoint(kind: str, out: Path, *, seed: int = 0) -> Path:
    """A random-initialised CLIP or SigLIP with tiny dims saved like a hub checkpoint (weights,
    config, processor config), for exercising the real loading and export code without a hub."""
    torch = _torch()
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    out = Path(out)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(layers, image_size=32, patch_size=8)
    if kind == "clip":
        # bos/eos/pad inside the 99-token vocabulary; eos_token_id 2 selects argmax pooling.
        text = dict(
            layers,
            vocab_size=99,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        mean, std = _DEFAULT_NORM["clip"]
    elif kind == "siglip":
        text = dict(layers, vocab_size=99, max_position_embeddings=64)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        mean, std = _DEFAULT_NORM["siglip"]
    else:
        raise ValueError(f"kind must be clip or siglip, not {kind!r}")
    with torch.no_grad():  # non-trivial scale and bias, so the score check means something
        model.logit_scale.fill_(float(np.log(10.0)))
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.fill_(-2.5)
    model.eval().save_pretrained(out)
    processor = {
        "do_resize": True,
        "size": {"height": 32, "width": 32},
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "image_processor_type": "CLIPImageProcessor" if kind == "clip" else "SiglipImageProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out
