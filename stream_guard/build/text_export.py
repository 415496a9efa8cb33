"""Export a Hugging Face text encoder (and sequence classifiers as text signals) for the text tower.

``stream-guard model export SRC --kind text --out DIR [--signals CLASSIFIER ...]`` loads any
``AutoModel`` text encoder (BERT, RoBERTa / XLM-RoBERTa, E5, GTE, MiniLM...; a hub id or a local
directory, the same loading code either way) and writes

* ``text_encoder.onnx``: ``input_ids`` / ``attention_mask`` int64 ``[batch, seq]`` ->
  ``embedding`` float32 ``[batch, D]``: mean pooling over real tokens (or the first token,
  ``--pooling cls``, for BGE-style models), then L2 normalisation, as sentence-transformers does;
* ``tokenizer.json``: the fast tokenizer, with the model's own padding token;
* per classifier (``SRC`` or ``NAME=SRC``), ``signals/<name>.onnx`` (-> ``probs`` [batch,
  labels]: softmax, or sigmoid for multi-label models) and ``signals/<name>.tokenizer.json``;
  its signals are named ``<name>:<label>`` from the model's ``id2label``, and a policy
  category lists them under ``text_signals``;
* ``export.json``: what was exported, and the largest difference from PyTorch on texts of
  several lengths (the export is verified at batch and sequence sizes it was not traced at).

``write_text_tower`` puts the export into a model repository as the ``text_encoder`` model (the
worker's text tower): its EMBEDDING output is the embedding followed by the signals, its config
names them (``stream_guard.text_signals``), and the policy compiler reads both from the served
config, so a head compiles on whatever tower is served.

Needs the ``export`` extra (torch, transformers); nothing on the serving path imports this module.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stream_guard.errors import ConfigError

__all__ = [
    "ENCODER_FILE",
    "Pooling",
    "REPORT_FILE",
    "SIGNALS_FILE",
    "SignalModel",
    "TextExportReport",
    "export_text_tower",
    "is_text_encoder",
    "read_text_export",
    "save_tiny_text_checkpoint",
    "signal_names",
    "text_tower_config",
    "write_text_tower",
]

Pooling = Literal["mean", "cls"]
ENCODER_FILE = "text_encoder.onnx"
REPORT_FILE = "export.json"
SIGNALS_FILE = "signals.json"  # beside model.onnx in the Triton version: what model.py runs
OPSET = 17
SAMPLE_TEXTS = [
    "a short one",
    "I will find you after school and you will regret it",
    "Selling my old bike, barely used, great condition, pick up only on weekends please " * 3,
]


@dataclass
class SignalModel:
    name: str
    source: str
    onnx: str
    tokenizer: str
    labels: list[str]
    activation: str  # softmax | sigmoid


@dataclass
class TextExportReport:
    kind: str
    source: str
    model_type: str
    embed_dim: int
    pooling: str
    max_length: int
    prefix: str
    opset: int
    text_onnx: str
    tokenizer: str
    signals: list[SignalModel] = field(default_factory=list)
    max_abs_error: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def signal_names(report: TextExportReport) -> list[str]:
    """The text signals a category may list, in the order they follow the embedding."""
    return [f"{s.name}:{label}" for s in report.signals for label in s.labels]


def read_text_export(export_dir: Path) -> TextExportReport:
    data = json.loads((Path(export_dir) / REPORT_FILE).read_text())
    if data.get("kind") != "text":
        raise ConfigError(f"{export_dir} holds a {data.get('kind')!r} export, not a text tower")
    data["signals"] = [SignalModel(**s) for s in data.get("signals", [])]
    return TextExportReport(**data)


# -- loading -----------------------------------------------------------------------------------


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


def _tokenizer(src: str, max_length: int):
    """The fast tokenizer of ``src`` as a ``tokenizers.Tokenizer`` with its own padding token
    and the truncation length the tower serves."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, use_fast=True)
    if not tok.is_fast:
        raise ConfigError(f"{src}: no fast tokenizer (tokenizer.json) can be built for it")
    backend = tok.backend_tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    backend.enable_padding(pad_id=pad_id, pad_token=tok.pad_token or "[PAD]")
    backend.enable_truncation(max_length=max_length)
    return backend


def is_text_encoder(src: str, trust_remote_code: bool = False) -> bool:
    """Whether ``src`` is a plain text encoder (not a CLIP / SigLIP dual encoder)."""
    _torch()
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the config of {src}: {e}") from e
    return cfg.model_type not in ("clip", "siglip") and not hasattr(cfg, "vision_config")


def _safe_name(src: str) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", Path(src.rstrip("/")).name.lower()).strip("_")
    return name or "signals"


# -- the modules exported ----------------------------------------------------------------------


def _encoder_module(model, pooling: Pooling):
    torch = _torch()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return pooled / pooled.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)

    return Encoder().eval()


def _classifier_module(model, activation: str):
    torch = _torch()

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return torch.sigmoid(logits) if activation == "sigmoid" else logits.softmax(-1)

    return Classifier().eval()


def _export(module, path: Path, output: str) -> None:
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones((2, 5), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        # Shape checks inside transformers trace as constants that hold for every input;
        # _verify runs other batch sizes and lengths to prove the axes are dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=[output],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, output: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def _load(cls_name: str, src: str, trust_remote_code: bool):
    import transformers

    cls = getattr(transformers, cls_name)
    try:
        # Eager attention traces to plain MatMul/Softmax on every transformers version.
        model = cls.from_pretrained(
            src, attn_implementation="eager", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load {src} as {cls_name}: {e}") from e
    return model.eval()


def _verify(module, tokenizer, path: Path, output: str, texts: list[str]) -> float:
    """Largest |ONNX - PyTorch| on ``texts`` (padded together: batch 3, several lengths)."""
    import onnxruntime as ort

    torch = _torch()
    enc = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = session.run([output], {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return float(np.abs(got - want).max())


def _export_signals(
    spec: str, out: Path, max_length: int, trust_remote_code: bool
) -> tuple[SignalModel, float]:
    """``spec`` is a hub id or directory, or ``name=source`` to choose the signals' prefix."""
    name, src = "", spec
    if "=" in spec and not Path(spec).exists():
        name, src = spec.split("=", 1)
    model = _load("AutoModelForSequenceClassification", src, trust_remote_code)
    cfg = model.config
    activation = "sigmoid" if cfg.problem_type == "multi_label_classification" else "softmax"
    labels = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
    name = _safe_name(name or src)
    tokenizer = _tokenizer(src, max_length)
    module = _classifier_module(model, activation)
    onnx_rel, tok_rel = f"signals/{name}.onnx", f"signals/{name}.tokenizer.json"
    _export(module, out / onnx_rel, "probs")
    tokenizer.save(str(out / tok_rel))
    error = _verify(module, tokenizer, out / onnx_rel, "probs", SAMPLE_TEXTS)
    return SignalModel(name, src, onnx_rel, tok_rel, labels, activation), error


def export_text_tower(
    src: str | Path,
    out: Path,
    *,
    signals: list[str] | None = None,
    pooling: Pooling = "mean",
    max_length: int = 128,
    prefix: str = "",
    trust_remote_code: bool = False,
) -> TextExportReport:
    """Export ``src`` as the text tower (and each of ``signals`` as text signals) into ``out``,
    verified against PyTorch; see the module docstring."""
    src = str(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"pooling must be mean or cls, not {pooling!r}")
    model = _load("AutoModel", src, trust_remote_code)
    tokenizer = _tokenizer(src, max_length)
    module = _encoder_module(model, pooling)
    _export(module, out / ENCODER_FILE, "embedding")
    tokenizer.save(str(out / "tokenizer.json"))
    texts = [prefix + t for t in SAMPLE_TEXTS]
    errors = {"embedding": _verify(module, tokenizer, out / ENCODER_FILE, "embedding", texts)}
    exported = []
    for s in signals or []:
        sig, err = _export_signals(str(s), out, max_length, trust_remote_code)
        if any(e.name == sig.name for e in exported):
            raise ConfigError(f"two signal models are both named {sig.name!r}: rename a folder")
        exported.append(sig)
        errors[f"signals:{sig.name}"] = err
    torch = _torch()
    with torch.no_grad():
        ids = torch.ones((1, 3), dtype=torch.int64)
        dim = int(module(ids, torch.ones_like(ids)).shape[-1])
    report = TextExportReport(
        kind="text",
        source=src,
        model_type=str(model.config.model_type),
        embed_dim=dim,
        pooling=pooling,
        max_length=max_length,
        prefix=prefix,
        opset=OPSET,
        text_onnx=ENCODER_FILE,
        tokenizer="tokenizer.json",
        signals=exported,
        max_abs_error=errors,
    )
    (out / REPORT_FILE).write_text(report.to_json())
    return report


# -- into a model repository -------------------------------------------------------------------


def text_tower_config(report: TextExportReport, *, name: str = "text_encoder") -> str:
    """config.pbtxt of the CPU-flavour text tower serving an export (Python backend)."""
    from stream_guard.build.repository import TEMPLATES

    template = (TEMPLATES / "cpu" / "text_encoder" / "config.pbtxt").read_text()
    width = report.embed_dim + len(signal_names(report))
    config = re.sub(r'name: "text_encoder"', f'name: "{name}"', template)
    config = re.sub(
        r'(name: "EMBEDDING", data_type: TYPE_FP32, dims: \[ )\d+( \])', rf"\g<1>{width}\2", config
    )
    config = re.sub(
        r'(key: "max_length" value: \{ string_value: ")\d+', rf"\g<1>{report.max_length}", config
    )
    names = json.dumps(signal_names(report)).replace("\\", "\\\\").replace('"', '\\"')
    header = (
        f"# Text tower exported from {report.source} by `stream-guard model export --kind text`"
        f" ({report.embed_dim}-d {report.pooling} pooling"
        + (f", then {len(report.signals)} signal model(s)" if report.signals else "")
        + ")\n"
    )
    config += (
        f'parameters {{ key: "stream_guard.text_signals" value: {{ string_value: "{names}" }} }}\n'
    )
    if report.prefix:
        prefix = json.dumps(report.prefix)[1:-1].replace("\\", "\\\\").replace('"', '\\"')
        config += f'parameters {{ key: "text_prefix" value: {{ string_value: "{prefix}" }} }}\n'
    return header + config


def write_text_tower(
    export_dir: Path, repo: Path, *, flavour: str = "cpu", name: str = "text_encoder"
) -> str:
    """Serve an export as the repository's text tower (replacing MiniLM); returns the model name.
    Heads compiled on another tower no longer fit it: recompile them (`policy compile`, or a
    worker with the repository recompiles at start)."""
    from stream_guard.build.repository import TEMPLATES

    export_dir, repo = Path(export_dir), Path(repo)
    report = read_text_export(export_dir)
    if flavour != "cpu":
        raise ConfigError(
            "an exported text tower is written for the cpu flavour (Python backend, onnxruntime);"
            " for GPU hosts see README 'A stronger text guard'"
        )
    dest = repo / name
    version = dest / "1"
    if version.exists():
        shutil.rmtree(version)
    version.mkdir(parents=True)
    (dest / "config.pbtxt").write_text(text_tower_config(report, name=name))
    shutil.copy(TEMPLATES / "cpu" / "text_encoder" / "1" / "model.py", version / "model.py")
    shutil.copy(export_dir / report.text_onnx, version / "model.onnx")
    shutil.copy(export_dir / report.tokenizer, version / "tokenizer.json")
    signals: list[dict[str, Any]] = []
    for s in report.signals:
        (version / "signals").mkdir(exist_ok=True)
        shutil.copy(export_dir / s.onnx, version / s.onnx)
        shutil.copy(export_dir / s.tokenizer, version / s.tokenizer)
        signals.append({"name": s.name, "onnx": s.onnx, "tokenizer": s.tokenizer})
    (version / SIGNALS_FILE).write_text(json.dumps({"signals": signals}, indent=2))
    shutil.copy(export_dir / REPORT_FILE, version / REPORT_FILE)
    return name


# -- tiny checkpoints (tests and smoke runs; no hub here) ------------------------------------


def save_tiny_text_checkpoint(
    family: str, out: Path, *, classifier_labels: list[str] | None = None, seed: int = 0
) -> Path:
    """A random-initialised BERT or RoBERTa with tiny dims and a real WordPiece / BPE tokenizer
    trained on a few sentences, saved like a hub checkpoint. With ``classifier_labels`` it is a
    sequence classifier (multi-label) instead of an encoder."""
    torch = _torch()
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = SAMPLE_TEXTS + ["the quick brown fox jumps over the lazy dog", "hello world"] * 5
    dims = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=160,
    )
    if family == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(
            corpus, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special)
        )
        tok.post_processor = processors.BertProcessing(
            ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
        )
        tok.decoder = decoders.WordPiece()
        fast = tf.BertTokenizerFast(tokenizer_object=tok, model_max_length=128)
        config = tf.BertConfig(vocab_size=tok.get_vocab_size(), **dims)
        base = "Bert"
    elif family == "roberta":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
        )
        tok.decoder = decoders.ByteLevel()
        fast = tf.RobertaTokenizerFast(tokenizer_object=tok, model_max_length=128)
        config = tf.RobertaConfig(vocab_size=tok.get_vocab_size(), pad_token_id=1, **dims)
        base = "Roberta"
    else:
        raise ValueError(f"family must be bert or roberta, not {family!r}")
    if classifier_labels:
        config.num_labels = len(classifier_labels)
        config.id2label = dict(enumerate(classifier_labels))
        config.label2id = {v: k for k, v in config.id2label.items()}
        config.problem_type = "multi_label_classification"
        model = getattr(tf, f"{base}ForSequenceClassification")(config)
    else:
        model = getattr(tf, f"{base}Model")(config)
    model.eval().save_pretrained(out)
    fast.save_pretrained(out)
    return out
