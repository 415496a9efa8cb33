"""Image decoding of untrusted uploads, and the detector preprocessing.

The hostile corpus (tests/hostile.py) is the table: each case ends with its dead-letter code or
decodes to upright uint8 RGB. Hypothesis then feeds random and mutated bytes: ``decode_image``
may only ever raise MediaError.
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from stream_guard.errors import ErrorCode, MediaError
from stream_guard.media.decode import (
    DecodedImage,
    ImageLimits,
    decode_image,
    preprocess_for_detector,
)
from tests.hostile import encode, gif_frame_flood, hostile_corpus, photo, png_from_rows

CORPUS = hostile_corpus()
DEFAULT = ImageLimits()


def decode(data: bytes, content_type: str | None = None, **limits) -> DecodedImage:
    return decode_image(data, content_type=content_type, limits=ImageLimits(**limits))


def code_of(data: bytes, content_type: str | None = None, **limits) -> ErrorCode:
    with pytest.raises(MediaError) as err:
        decode(data, content_type, **limits)
    assert err.value.stage == "decode"
    return err.value.code


# --- the hostile corpus -------------------------------------------------------------------


def test_corpus_has_at_least_32_uniquely_named_cases_of_both_kinds():
    names = [c.name for c in CORPUS]
    assert len(names) >= 32 and len(set(names)) == len(names)
    assert any(c.expected_code is None for c in CORPUS)
    assert {c.expected_code for c in CORPUS} >= {
        ErrorCode.MEDIA_TOO_LARGE,
        ErrorCode.IMAGE_UNDECODABLE,
        ErrorCode.IMAGE_UNSUPPORTED_FORMAT,
        ErrorCode.IMAGE_CONTENT_TYPE_MISMATCH,
        ErrorCode.IMAGE_DIMENSIONS,
        ErrorCode.IMAGE_DECOMPRESSION_BOMB,
        ErrorCode.IMAGE_TOO_MANY_FRAMES,
    }


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_case_ends_with_its_code_or_decodes_to_rgb(case):
    if case.expected_code is not None:
        assert code_of(case.data, case.content_type) == case.expected_code
        return
    image = decode_image(case.data, content_type=case.content_type, limits=DEFAULT)
    assert image.rgb.dtype == np.uint8
    assert image.rgb.shape == (image.height, image.width, 3)
    assert not image.rgb.flags.writeable
    assert image.format in DEFAULT.allowed_formats
    assert 1 <= image.frames <= DEFAULT.max_frames


def test_error_reason_is_the_same_on_every_attempt():
    # Redelivered events must dead-letter identically: no addresses or timings in reasons.
    for case in CORPUS:
        if case.expected_code is None:
            continue
        reasons = set()
        for _ in range(2):
            with pytest.raises(MediaError) as err:
                decode_image(case.data, content_type=case.content_type, limits=DEFAULT)
            reasons.add(err.value.reason)
        assert len(reasons) == 1, case.name


def test_decoding_leaves_pillow_globals_alone():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for case in CORPUS:
        try:
            decode_image(case.data, content_type=case.content_type, limits=DEFAULT)
        except MediaError:
            pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_decoding_the_whole_corpus_stays_under_300_mb_traced_peak():
    # tracemalloc sees Python and numpy allocations (the output array, bytes), not Pillow's
    # C-heap image buffers; the biggest case is a 6000x6000 PNG (108 MB of RGB output).
    tracemalloc.start()
    try:
        for case in CORPUS:
            try:
                decode_image(case.data, content_type=case.content_type, limits=DEFAULT)
            except MediaError:
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\npeak traced allocation decoding {len(CORPUS)} cases: {peak / 2**20:.1f} MiB")
    assert peak < 300 * 2**20


# --- orientation and pixel modes ----------------------------------------------------------


def test_exif_orientation_6_turns_a_20x10_image_into_10x20():
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode(encode(photo(20, 10), "JPEG", exif=exif), "image/jpeg")
    assert (image.width, image.height) == (10, 20)
    assert image.rgb.shape == (20, 10, 3)
    assert image.orientation_applied


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    source = photo(7, 4)
    data = encode(source, "PNG", exif=exif)  # lossless, so pixels compare exactly
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    image = decode(data, "image/png")
    np.testing.assert_array_equal(image.rgb, expected)
    assert image.orientation_applied == (orientation != 1)


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    image = decode(encode(Image.fromarray(values), "PNG"))
    assert image.rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (image.rgb == image.rgb[:, :, :1]).all()


def test_transparent_palette_pixels_become_white():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    image = decode(encode(palette_image, "PNG", transparency=0))
    assert image.rgb[0].tolist() == [[255, 255, 255], [200, 0, 0]]


def test_alpha_is_composited_onto_white():
    rgba = Image.new("RGBA", (3, 1))
    for x, a in enumerate((0, 128, 255)):
        rgba.putpixel((x, 0), (255, 0, 0, a))
    image = decode(encode(rgba, "PNG"))
    assert image.rgb[0].tolist() == [[255, 255, 255], [255, 127, 127], [255, 0, 0]]


def test_cmyk_jpeg_decodes_to_the_colours_pillow_gives():
    data = encode(photo(40, 30).convert("CMYK"), "JPEG", quality=95)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode(data, "image/jpeg").rgb, expected)


def test_float_tiff_in_unit_range_is_scaled_to_full_grey_range():
    values = np.array([[0.0, 0.5, 1.0]], np.float32)
    image = decode(encode(Image.fromarray(values), "TIFF"))
    assert image.rgb[0, :, 0].tolist() == [0, 128, 255]


def test_sixteen_bit_rgb_png_keeps_the_high_byte():
    data = png_from_rows(2, 1, b"\xff\xff\x80\x00\x00\x00" * 2, 16, 2)
    assert decode(data).rgb[0, 0].tolist() == [255, 128, 0]


def test_large_image_converted_in_bands_matches_pillow_convert():
    source = photo(1200, 1000).convert("P")  # about 2 bands of 4 MB
    data = encode(source, "PNG")
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode(data).rgb, expected)


# --- frames, formats, content types, limits -----------------------------------------------


def test_gif_frame_flood_is_refused_after_counting_just_past_the_limit():
    with pytest.raises(MediaError) as err:
        decode(gif_frame_flood(200_000))
    assert err.value.code == ErrorCode.IMAGE_TOO_MANY_FRAMES
    assert err.value.reason.startswith(f"{DEFAULT.max_frames + 1} or more frames")


def test_animation_within_the_limit_reports_its_frames_and_decodes_the_first():
    image = decode(gif_frame_flood(10))
    assert image.frames == 10 and image.rgb.shape == (1, 1, 3)


def test_frame_limit_is_configurable():
    assert code_of(gif_frame_flood(10), max_frames=9) == ErrorCode.IMAGE_TOO_MANY_FRAMES
    assert decode(gif_frame_flood(9), max_frames=9).frames == 9


def test_formats_outside_the_configured_allow_list_are_unsupported():
    data = encode(photo(4, 4), "TIFF")
    assert code_of(data, allowed_formats=frozenset({"JPEG", "PNG"})) == (
        ErrorCode.IMAGE_UNSUPPORTED_FORMAT
    )


@pytest.mark.parametrize(
    "content_type", [None, "", "application/octet-stream", "binary/octet-stream", " IMAGE/PNG "]
)
def test_untyped_or_matching_content_types_pass(content_type):
    assert decode(encode(photo(4, 4), "PNG"), content_type).format == "PNG"


@pytest.mark.parametrize(
    "content_type", ["image/gif", "text/html", "application/pdf", "image/svg+xml", "video/mp4"]
)
def test_other_declared_types_are_a_content_type_mismatch(content_type):
    data = encode(photo(4, 4), "PNG")
    assert code_of(data, content_type) == ErrorCode.IMAGE_CONTENT_TYPE_MISMATCH


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    data = png_from_rows(3000, 3000, b"\x00" * 3000, 8, 0)
    assert code_of(data, max_pixels=8_999_999) == ErrorCode.IMAGE_DECOMPRESSION_BOMB
    assert decode(data, max_pixels=9_000_000).rgb.shape == (3000, 3000, 3)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_maps_to_the_bomb_code():
    # Limits above Pillow's own (89 Mpx warns): Pillow's guard fires first and is mapped.
    data = png_from_rows(10_000, 10_000, b"\x00" * 1250, 1, 0)
    assert code_of(data, max_pixels=150_000_000) == ErrorCode.IMAGE_DECOMPRESSION_BOMB


def test_progressive_scan_limit_is_configurable():
    data = encode(photo(32, 32), "JPEG", progressive=True)
    assert decode(data).format == "JPEG"
    assert code_of(data, max_jpeg_scans=2) == ErrorCode.IMAGE_DECOMPRESSION_BOMB


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_bytes=0),
        dict(min_side=0),
        dict(max_frames=0),
        dict(min_side=10, max_side=5),
        dict(allowed_formats={"SVG"}),
        dict(allowed_formats=frozenset()),
        dict(max_jpeg_scans=0),
    ],
)
def test_invalid_limits_are_refused_when_built(bad):
    with pytest.raises(ValueError):
        ImageLimits(**bad)


def test_allowed_formats_are_normalised_to_upper_case():
    assert ImageLimits(allowed_formats=frozenset({"png"})).allowed_formats == {"PNG"}


# --- property tests: any bytes end as an image or a MediaError ----------------------------

FUZZ_LIMITS = ImageLimits(max_pixels=4_000_000)  # small, so each example stays cheap
SEEDS = [
    encode(photo(16, 12), "PNG"),
    encode(photo(16, 12), "JPEG"),
    encode(photo(16, 12), "JPEG", progressive=True),
    encode(photo(16, 12).convert("P"), "GIF"),
    encode(photo(16, 12), "WEBP"),
    encode(photo(16, 12), "BMP"),
    encode(photo(16, 12), "TIFF", compression="tiff_lzw"),
    gif_frame_flood(3),
]
MAGICS = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
]
# Pillow warns (UserWarning) about corrupt EXIF and the like while we read mutated files.
QUIET = pytest.mark.filterwarnings("ignore::UserWarning:PIL")
FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def decodes_or_raises_media_error(data: bytes, content_type: str | None = None) -> None:
    try:
        image = decode_image(data, content_type=content_type, limits=FUZZ_LIMITS)
    except MediaError:
        return
    assert image.rgb.dtype == np.uint8 and image.rgb.shape == (image.height, image.width, 3)


@QUIET
@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([None, "image/png", "text/html"]))
def test_random_bytes_only_ever_raise_media_error(data, content_type):
    decodes_or_raises_media_error(data, content_type)


@QUIET
@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_random_bytes_behind_an_image_signature_only_ever_raise_media_error(magic, rest):
    decodes_or_raises_media_error(magic + rest)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


@QUIET
@FUZZ
@given(mutated())
def test_mutated_valid_images_only_ever_raise_media_error(data):
    decodes_or_raises_media_error(data)


# --- detector preprocessing ---------------------------------------------------------------

# Tolerance: OpenCV resizes uint8 with 11-bit fixed-point weights; we reproduce that arithmetic,
# so downscales match exactly and upscales (image side < 320) differ by at most 1 grey level.
GREY_LEVEL_TOLERANCE = 1
SHAPES = [
    (600, 512),
    (512, 600),
    (320, 320),
    (640, 640),
    (640, 480),
    (333, 777),
    (4000, 3000),
    (100, 37),
    (160, 160),
    (1, 1),
    (2, 3),
    (959, 1),
]


@pytest.fixture(scope="module")
def nudenet():
    pytest.importorskip("cv2")
    return pytest.importorskip("nudenet.nudenet")


def nudenet_blob_as_hwc(blob: np.ndarray) -> np.ndarray:
    return np.rint(blob[0].transpose(1, 2, 0) * 255).astype(np.int16)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
def test_preprocess_matches_nudenet_on_an_rgb_array_within_one_grey_level(nudenet, shape):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), np.uint8)
    blob, x_ratio, y_ratio, x_pad, y_pad, width, height = nudenet._read_image(rgb.copy(), 320)
    ours = preprocess_for_detector(rgb)
    assert ours.image.shape == (320, 320, 3) and ours.image.dtype == np.uint8
    diff = np.abs(ours.image.astype(np.int16) - nudenet_blob_as_hwc(blob))
    assert diff.max() <= GREY_LEVEL_TOLERANCE
    if max(shape) >= 320:
        assert diff.max() == 0
    assert (ours.pad_x, ours.pad_y, ours.width, ours.height) == (x_pad, y_pad, width, height)
    assert ours.scale == pytest.approx((width + x_pad) / 320)


def test_nudenet_reading_encoded_bytes_feeds_the_model_bgr(nudenet):
    # NudeNet decodes bytes/paths to BGR and then swaps twice: its blob is BGR. Ours stays RGB
    # (what the YOLOv8 export was trained on); this pins the difference down.
    rgb = np.asarray(photo(500, 400))  # a downscale, where we match OpenCV exactly
    blob, *_ = nudenet._read_image(encode(Image.fromarray(rgb), "PNG"), 320)
    ours = preprocess_for_detector(rgb).image
    np.testing.assert_array_equal(ours[:, :, ::-1], nudenet_blob_as_hwc(blob))


def test_box_maps_back_to_the_original_image_like_nudenet():
    prepared = preprocess_for_detector(np.zeros((600, 512, 3), np.uint8))
    assert prepared.scale == 600 / 320
    # NudeNet: x * (width + x_pad) / 320, clipped to the image.
    assert prepared.to_image_box(32, 16, 64, 48) == pytest.approx((60, 30, 120, 90))
    assert prepared.to_image_box(300, 310, 100, 100) == pytest.approx(
        (512, 581.25, 0, 600 - 581.25)
    )


def test_decoded_upload_goes_straight_into_preprocessing():
    image = decode(encode(photo(800, 300), "JPEG"), "image/jpeg")
    prepared = preprocess_for_detector(image.rgb)
    assert prepared.image.shape == (320, 320, 3)
    assert prepared.pad_y == 500 and not prepared.image[130:].any()  # padding is black


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((0, 4, 3), np.uint8),
    ],
)
def test_preprocess_refuses_anything_but_uint8_rgb(array):
    with pytest.raises(ValueError):
        preprocess_for_detector(array)
