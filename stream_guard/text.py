"""What of an upload's text the text tower reads: whole-text windows and de-obfuscated forms.

The text tower reads at most 128 word pieces (about 90 English words); anything after that
would be invisible. So every text is cut into overlapping windows of words, each scored on its
own; each category keeps its highest score over the windows (an upload is as unsafe as its
worst part). A per-upload budget bounds the cost: text beyond it is not silently ignored, the
segments say so (``truncated``) and the upload escalates.

Obfuscated spellings (leetspeak, spaces or dots inside words, homoglyphs, zero-width and
combining characters, repeated letters) are undone in a normalised copy that is scored beside
the raw text when it differs; words run together (hashtags such as ``#killthemall``, long
tokens, and text read from images, where OCR drops spaces: "IWILL KILL YOU") are split by
word frequencies (wordninja, English Wikipedia unigrams). Dialogs are scored as the prompt, the
response, and both together.

Pure functions, no I/O: table-tested in ``tests/unit/test_text.py``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from stream_guard.events import UploadText

__all__ = [
    "DEFAULT_MAX_SEGMENTS",
    "STRIDE_WORDS",
    "WINDOW_WORDS",
    "FOCUS_WORDS",
    "Segments",
    "focus_chunks",
    "image_text_segments",
    "normalise",
    "segments",
    "split_words",
    "windows",
]

WINDOW_WORDS = 80  # ~110 word pieces: inside the 128-piece window with room for subwords
STRIDE_WORDS = 60  # 20 words of overlap: a sentence cut by one window is whole in the next
FOCUS_WORDS = 30  # sentence chunks of a longer text: one harmful sentence is not averaged away
DEFAULT_MAX_SEGMENTS = 24  # ~1,500 words of raw text per upload

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"), None)
# Latin look-alikes from Cyrillic and Greek, and digits/symbols of leetspeak (inside words only).
_HOMOGLYPHS = str.maketrans(
    "аеорсуххіјѕԁɡһӏոѵԝАВЕКМНОРСТХՍαορτυνκιΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeopcyxxijsdghlnvwABEKMHOPCTXUaoptuvkiABEZHIKMNOPTYX",
)
_LEET = str.maketrans(
    {
        "0": "o",
        "1": "i",
        "3": "e",
        "4": "a",
        "5": "s",
        "7": "t",
        "@": "a",
        "$": "s",
        "!": "i",
        "|": "l",
        "8": "b",
        "9": "g",
    }
)
# A word with a letter right before a leet character: "k1ll", "h8te", "b!tch" (not "90th", "2nd")
_LEET_WORD = re.compile(r"(?<![\w@$!|])[A-Za-z]+[0-9@$!|][\w@$!|]*")
# Single letters separated by spaces, dots, dashes, underscores or asterisks: "k i l l", "k.i.l.l"
_SPACED = re.compile(r"\b(?:[A-Za-z][ .\-_*]{1,2}){2,}[A-Za-z]\b")
_REPEATS = re.compile(r"([A-Za-z])\1{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")
# Hashtags, and letter runs long enough to be several words (English words rarely exceed 14).
_RUN_TOGETHER = re.compile(r"#[A-Za-z][A-Za-z0-9_]+|\b[A-Za-z]{15,}\b")


def split_words(text: str, *, every_token: bool = False) -> str:
    """Words run together split apart: hashtags and long letter runs, or (``every_token``, for
    text read from images) every token. Text without such tokens comes back unchanged."""
    import wordninja  # ~1 MB of unigram frequencies, loaded on first use

    def split(token: str) -> str:
        parts = wordninja.split(token)
        return " ".join(parts) if len(parts) > 1 else token

    if every_token:
        return " ".join(split(t) if t.isalpha() and len(t) > 3 else t for t in text.split())
    return _RUN_TOGETHER.sub(lambda m: split(m.group(0).lstrip("#")), text)


def normalise(text: str) -> str:
    """A de-obfuscated copy: compatibility forms, no zero-width or combining marks, Latin
    homoglyphs, leetspeak inside words, letters joined across inner spacing, letter runs of
    three or more cut to two."""
    t = unicodedata.normalize("NFKD", text).translate(_ZERO_WIDTH)
    t = "".join(ch for ch in t if not unicodedata.combining(ch))
    t = t.translate(_HOMOGLYPHS)
    t = _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), t)
    t = _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group(0)), t)
    t = _REPEATS.sub(r"\1\1", t)
    t = split_words(t)
    return re.sub(r"\s+", " ", t).strip()


def windows(text: str, size: int = WINDOW_WORDS, stride: int = STRIDE_WORDS) -> list[str]:
    """Overlapping windows of ``size`` words every ``stride`` words, covering the whole text."""
    words = text.split()
    if len(words) <= size:
        return [text.strip()] if words else []
    out = []
    for start in range(0, len(words), stride):
        out.append(" ".join(words[start : start + size]))
        if start + size >= len(words):
            break
    return out


def focus_chunks(text: str, size: int = FOCUS_WORDS) -> list[str]:
    """Runs of whole sentences of at most ``size`` words (a longer sentence: its own windows).
    A window's embedding is the mean over its ~80 words, so one harmful sentence in a long
    benign post is diluted; a chunk of a few sentences keeps it in focus."""
    out: list[str] = []
    run: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        if not words:
            continue
        if len(run) + len(words) > size and run:
            out.append(" ".join(run))
            run = []
        if len(words) > size:
            out += windows(sentence, size, size * 2 // 3)
        else:
            run += words
    if run:
        out.append(" ".join(run))
    return out


@dataclass(frozen=True)
class Segments:
    texts: list[str]
    truncated: bool  # the budget cut the text: the upload escalates and the verdict says so


def _parts(text: UploadText) -> list[str]:
    joined = text.joined()
    if not joined:
        return []
    parts = [joined]
    if text.prompt and text.response:  # a dialog: each side alone, and both together
        parts += [text.prompt, text.response]
    return parts


def image_text_segments(text: str) -> list[str]:
    """What is scored of the text read in an upload's images: its windows, and each window
    with every run-together token split (OCR often drops the spaces between words)."""
    raw = windows(text)
    split = [n for w in raw if (n := split_words(normalise(w), every_token=True)) != w]
    return list(dict.fromkeys(raw + split))


def segments(text: UploadText, max_segments: int = DEFAULT_MAX_SEGMENTS) -> Segments:
    """The strings the text tower scores for one upload, in priority order, within budget.

    First the windows that cover every word (raw, then de-obfuscated): if they do not fit, the
    upload is ``truncated``. Then, as the budget allows, sentence chunks of texts longer than
    FOCUS_WORDS (a closer look at text the windows already cover, so never "truncated")."""
    cover: list[str] = []
    focus: list[str] = []
    for part in _parts(text):
        raw = windows(part)
        cover += raw + _folded(raw)
        if len(part.split()) > FOCUS_WORDS:
            chunks = focus_chunks(part)
            focus += chunks + _folded(chunks)
    unique = list(dict.fromkeys(w for w in cover if w))
    if len(unique) > max_segments:
        return Segments(unique[:max_segments], True)
    seen = set(unique)
    extra = [f for f in dict.fromkeys(focus) if f and f not in seen]
    return Segments(unique + extra[: max_segments - len(unique)], False)


def _folded(texts: list[str]) -> list[str]:
    return [n for w in texts if (n := normalise(w)) and n != w]
