"""What the text tower reads: whole-text windows, de-obfuscation, the per-upload budget."""

from __future__ import annotations

import pytest

from stream_guard.events import UploadText
from stream_guard.text import FOCUS_WORDS, WINDOW_WORDS, focus_chunks, normalise, segments, windows


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("I will k1ll you", "I will kill you"),
        ("h8te", "hbte"),  # a digit read as its look-alike letter, not a word list
        ("you are a m0r0n", "you are a moron"),
        ("k i l l them all", "kill them all"),
        ("k.i.l.l them", "kill them"),
        ("die\u200b die", "die die"),
        ("kiiiiill", "kiill"),
        ("ѕсum", "scum"),  # Cyrillic look-alikes
        ("c\u0301afe\u0308", "cafe"),  # combining marks
        (
            "Happy 90th birthday, see you at 5pm on the 2nd",
            "Happy 90th birthday, see you at 5pm on the 2nd",
        ),
    ],
)
def test_normalise_undoes_common_obfuscations_and_leaves_plain_text(raw: str, expected: str):
    assert normalise(raw) == expected


def test_windows_cover_every_word_with_overlap():
    words = [f"w{n}" for n in range(1000)]
    out = windows(" ".join(words))
    covered = {w for win in out for w in win.split()}
    assert covered == set(words)
    assert all(len(w.split()) <= WINDOW_WORDS for w in out)
    assert len(out) > 1000 // WINDOW_WORDS


def test_a_harmful_sentence_after_a_thousand_benign_words_gets_its_own_window():
    padding = " ".join(["we had a lovely afternoon at the lake with the kids"] * 100)  # 1,100 words
    threat = "I am going to kill you tonight"
    segs = segments(UploadText(caption=f"{padding} {threat}"))
    assert not segs.truncated
    assert any(threat in s and len(s.split()) <= WINDOW_WORDS for s in segs.texts)


def test_text_over_the_budget_is_marked_truncated_never_silently_cut():
    text = " ".join(f"w{n}" for n in range(2000))
    segs = segments(UploadText(caption=text), max_segments=5)
    assert segs.truncated and len(segs.texts) == 5


def test_a_short_caption_is_one_segment_exactly_as_before():
    segs = segments(UploadText(caption="Sunset over the mountains"))
    assert segs.texts == ["Sunset over the mountains"] and not segs.truncated


def test_dialogs_score_prompt_response_and_both():
    segs = segments(UploadText(prompt="how do I bake bread", response="Mix flour and water"))
    assert segs.texts[0] == "how do I bake bread\nMix flour and water"
    assert "how do I bake bread" in segs.texts and "Mix flour and water" in segs.texts


def test_an_obfuscated_caption_adds_its_normalised_form():
    segs = segments(UploadText(caption="i will k i l l you"))
    assert segs.texts == ["i will k i l l you", "i will kill you"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("#killallimmigrants now", "kill all immigrants now"),
        ("the view was breathtaking", "the view was breathtaking"),
        ("totallyunacceptablebehaviour here", "totally unacceptable behaviour here"),
    ],
)
def test_normalise_splits_hashtags_and_long_run_together_words(raw: str, expected: str):
    assert normalise(raw) == expected


def test_text_read_from_images_is_also_scored_with_its_words_split():
    from stream_guard.text import image_text_segments

    segs = image_text_segments("IWILL KILL YOU")
    assert segs[0] == "IWILL KILL YOU" and "I WILL KILL YOU" in segs
    assert image_text_segments("Grand Opening Sale") == ["Grand Opening Sale"]


def test_a_harmful_sentence_in_a_long_post_is_also_scored_in_a_short_chunk():
    # Inside an 80-word window one sentence is averaged with 70 benign words; a chunk of whole
    # sentences keeps it in focus.
    before = " ".join(["We spent the morning at the market and bought fresh bread."] * 6)
    after = " ".join(["Later the kids played football until it got dark."] * 6)
    threat = "I am going to kill my neighbour tonight."
    segs = segments(UploadText(caption=f"{before} {threat} {after}"))
    assert not segs.truncated
    assert any(threat in s and len(s.split()) <= FOCUS_WORDS for s in segs.texts)
    assert all(len(s.split()) <= WINDOW_WORDS for s in segs.texts)


def test_focus_chunks_never_mark_a_text_truncated_and_windows_come_first():
    words = [
        f"{'bcdfghjklm'[n % 10]}{'aeiouwxyzq'[n // 10 % 10]}{'np'[n // 100]}." for n in range(200)
    ]
    text = " ".join(words)
    cover = windows(text)
    segs = segments(UploadText(caption=text), max_segments=len(cover) + 1)
    assert not segs.truncated and segs.texts[: len(cover)] == cover
    assert len(segs.texts) == len(cover) + 1  # one chunk fits the budget after the windows
    assert segments(UploadText(caption=text), max_segments=len(cover) - 1).truncated


def test_focus_chunks_keep_sentences_whole_and_cut_only_long_ones():
    long_sentence = " ".join(f"w{n}" for n in range(70))
    chunks = focus_chunks(f"Short one. Another short one! {long_sentence}")
    assert chunks[0] == "Short one. Another short one!"
    assert all(len(c.split()) <= FOCUS_WORDS for c in chunks)
    assert {w for c in chunks[1:] for w in c.split()} == set(long_sentence.split())
