"""SageMaker PyTorch handler for CLIP, and THE one CLIP implementation of clipsearch.

SageMaker calls model_fn / input_fn / predict_fn / output_fn in its container; the local encoder
calls the same functions in-process. torch and clip are imported lazily so that the image
decoding helpers here can be imported where torch is absent (the Lambda packages).

Environment: MODEL_NAME (a checkpoint file in model_dir, or a model spec such as `demo` / `RN50`),
ENCODE_TYPE=TEXT|IMAGE (optional; restricts the endpoint to one kind).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import io
import json
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# One place for the pixel limits: decoding refuses anything bigger (decompression bombs).
MAX_PIXELS = 100_000_000
# Images are downscaled to this shorter side before transport / encoding; well above every CLIP
# input resolution, and small enough that a PNG stays far below SageMaker's 4 MB payload limit.
MAX_SIDE = 448
# CLIP's preprocessing resizes the shorter side and keeps only the centre square, so a long side beyond
# this ratio never reaches the model: the decode centre-crops it away first. That bounds every image
# to 448 x 896 after downscale (a noisy PNG of that size is ~1.2 MB, under the 4 MB payload limit),
# and stops the model's resize from blowing a 1 x 300,000 strip up to gigabytes.
MAX_ASPECT = 2
# Shorter sides below this are refused: blown up to CLIP's 224 pixels they show the model nothing.
MIN_SIDE = 16
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# The frozen image graph takes 5-15 s to build on CPU and saves ~40% of each RN50 forward: build it
# once this many images have gone through eagerly, so one-off queries never pay for it.
GRAPH_AFTER_IMAGES = 256


class ImageFormat(NamedTuple):
    """A picture format, known by its file extension."""

    content_type: str | None  # None: camera RAW, which is only ever read from a file with its name
    # Taken as a request body (the search API, this endpoint): what a browser sends as it is, and what it
    # cannot draw (HEIC, AVIF). The web page turns the other formats into PNG or JPEG before sending.
    upload: bool = False
    # Camera RAW: most are TIFF inside, where Pillow would read a tiny thumbnail or nothing. What is
    # indexed is the camera's embedded JPEG preview, taken out with rawpy (LibRaw).
    raw: bool = False


# Camera RAW, by maker: Adobe DNG, Canon, Nikon, Sony, Fujifilm, Olympus, Panasonic, Pentax, Samsung, Sigma...
_RAW_NAMES = ".dng .cr2 .cr3 .nef .nrw .arw .srf .sr2 .raf .orf .rw2 .pef .srw .x3f .3fr .iiq .rwl .erf .kdc .mrw .raw"
# The one table of picture formats: clipsearch.images derives the file names it indexes, the content types the
# API takes and the local server sends from it. It lives here because the SageMaker container needs it
# (input_fn, RAW by name) and cannot import clipsearch. HEIC/HEIF decode through pillow-heif, AVIF through
# Pillow 11.3 on, RAW through rawpy: without those libraries such files are refused with the reason.
IMAGE_FORMATS: dict[str, ImageFormat] = {
    ".jpg": ImageFormat("image/jpeg", upload=True),
    ".jpeg": ImageFormat("image/jpeg", upload=True),
    ".png": ImageFormat("image/png", upload=True),
    ".webp": ImageFormat("image/webp", upload=True),
    ".heic": ImageFormat("image/heic", upload=True),
    ".heif": ImageFormat("image/heif", upload=True),
    ".avif": ImageFormat("image/avif", upload=True),
    ".gif": ImageFormat("image/gif"),
    ".bmp": ImageFormat("image/bmp"),
    ".tif": ImageFormat("image/tiff"),
    ".tiff": ImageFormat("image/tiff"),
    **dict.fromkeys(_RAW_NAMES.split(), ImageFormat(None, raw=True)),
}
RAW_EXTENSIONS = frozenset(ext for ext, fmt in IMAGE_FORMATS.items() if fmt.raw)
# The picture content types a request body may have, in the table's order, each once.
UPLOAD_TYPES = tuple(
    dict.fromkeys(fmt.content_type for fmt in IMAGE_FORMATS.values() if fmt.upload and fmt.content_type)
)
JSON_TYPES = ("application/json",)
# application/x-image: what a batch transform sends (clipsearch/aws/backfill.py), whatever the picture.
IMAGE_TYPES = ("application/x-image", *UPLOAD_TYPES)
DEFAULT_MODEL = "demo"
TEXT, IMAGE = "TEXT", "IMAGE"


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message names the fix."""


try:
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:  # clipsearch itself and the Lambdas run without the serving toolkit
    _ToolkitError = Exception


class BadInput(ValueError, _ToolkitError):
    """A request the model refuses. A ValueError everywhere (CONTRACT §2); inside the SageMaker
    toolkit also its BaseInferenceToolkitError with status 400, since the toolkit's Transformer
    answers every other exception with 500 (sagemaker_inference/transformer.py, transform()).
    """

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)  # str(e) is the message, whichever base is present
        self.status_code, self.message, self.phrase = 400, message, "Bad Request"


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _refusals_as_bad_input(fn: _Fn) -> _Fn:
    """Re-raise a parsing function's ValueError as BadInput. functools.wraps keeps the signature,
    which the toolkit inspects to decide whether to pass its context.

    Only for input_fn, where every ValueError is a refusal of the request. predict_fn raises BadInput
    itself: a ValueError from torch or numpy there is the endpoint's fault (500, retried), not the
    picture's (400, which ingest never retries).
    """

    @functools.wraps(fn)
    def serving_function(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BadInput:
            raise
        except ValueError as e:
            raise BadInput(str(e)) from None

    return serving_function  # type: ignore[return-value]


# `clipsearch package-model` vendors what the serving image lacks (clip-anytorch, ftfy, regex and
# their pure-Python dependencies) into code/lib beside this file, so that a cold start needs no
# package index. Ahead of site-packages: the archive's pinned versions win. They are built for one
# Python (regex is compiled), recorded in the archive's manifest beside code/: on another Python the
# folder stays off the path and model_fn says why, instead of failing on regex's import.
_VENDORED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
# The archive's manifest (clipsearch/sagemaker/packaging.py MANIFEST), at the top of the model directory.
MANIFEST = "clipsearch-model.json"


def _vendored_python(lib: str) -> str | None:
    """The Python version ("3.11") that code/lib was built for, per the manifest; None when unrecorded."""
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(lib)), MANIFEST), encoding="utf-8") as f:
            value = json.load(f).get("python")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _vendored_mismatch(lib: str) -> str | None:
    built_for = _vendored_python(lib)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if built_for is None or built_for == running:
        return None
    return (
        f"the model archive's libraries (code/lib) are built for Python {built_for}, but this image runs "
        f"Python {running}: use a -py{built_for.replace('.', '')} inference image (InferenceImageUri)"
    )


_VENDORED_MISMATCH = _vendored_mismatch(_VENDORED) if os.path.isdir(_VENDORED) else None
if os.path.isdir(_VENDORED) and _VENDORED_MISMATCH is None and _VENDORED not in sys.path:
    sys.path.insert(0, _VENDORED)


@dataclass
class ClipModel:
    """A loaded CLIP model with the preprocessing that belongs to it."""

    name: str
    model: Any
    preprocess: Any
    dim: int
    context_length: int
    encode_type: str | None = None
    # Graphs compiled on first use (see _image_tower): a cache, not part of the model's identity.
    graphs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


# -- images -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedImage:
    """A picture ready for the model (downscaled), with the upright size of the original.

    taken_at: EXIF DateTimeOriginal as wall-clock "YYYY-MM-DDTHH:MM:SS" (None: the picture has none);
    taken_offset: OffsetTimeOriginal ("+02:00") when given, else "".
    """

    image: Image.Image
    width: int
    height: int
    taken_at: str | None = None
    taken_offset: str = ""


# The transpose that undoes each EXIF orientation (ImageOps.exif_transpose's table).
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
# EXIF 2.32: the Exif IFD pointer in IFD0, and in it DateTimeOriginal ("YYYY:MM:DD HH:MM:SS") and
# OffsetTimeOriginal ("+HH:MM"), the capture time's offset from UTC.
_EXIF_IFD, _DATETIME_ORIGINAL, _OFFSET_TIME_ORIGINAL = 0x8769, 0x9003, 0x9011
_EXIF_DATETIME = re.compile(r"(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"[+-](?:0\d|1[0-4]):[0-5]\d")


def capture_time(exif: Image.Exif) -> tuple[str | None, str]:
    """(taken_at, taken_offset) from EXIF: a wall-clock "YYYY-MM-DDTHH:MM:SS" or None, and "+02:00" or "".

    Cameras with no clock set write blanks or zeros; those, and any impossible date, count as none.
    """
    try:
        ifd = exif.get_ifd(_EXIF_IFD)
    except (KeyError, ValueError, TypeError, OSError, SyntaxError):
        return None, ""
    raw = ifd.get(_DATETIME_ORIGINAL)
    text = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")).strip("\x00 ")
    match = _EXIF_DATETIME.fullmatch(text)
    if not match:
        return None, ""
    try:
        year, month, day, hour, minute, second = map(int, match.groups())
        taken = datetime.datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None, ""
    offset = str(ifd.get(_OFFSET_TIME_ORIGINAL) or "").strip("\x00 ")
    return taken.isoformat(timespec="seconds"), offset if _EXIF_OFFSET.fullmatch(offset) else ""


def read_capture_time(data: bytes) -> tuple[str | None, str]:
    """capture_time() of a picture's bytes from its header alone: no pixel is decoded (a cheap re-read)."""
    if _is_heif(data) and _heif_opener() is not None:
        return None, ""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return capture_time(img.getexif())
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError):
        return None, ""


# ISO base media brands (the ftyp box at offset 4) of HEIF stills, which Pillow reads through pillow-heif.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
# LibRaw's `flip` (its sizes.flip) as the EXIF orientation that means the same turn.
_FLIP_TO_ORIENTATION = {3: 3, 5: 8, 6: 6}


@functools.cache
def _heif_opener() -> str | None:
    """Register pillow-heif's HEIF opener (once, on the first HEIF seen: no import cost otherwise);
    None when it is there, else why not. Its AVIF opener too where this Pillow has no AVIF of its own
    (the SageMaker image's Pillow predates 11.3, and pillow-heif before 1.0 still carries one)."""
    try:
        import pillow_heif  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "HEIC/HEIF needs pillow-heif (pip install pillow-heif)"
    pillow_heif.register_heif_opener()
    from PIL import features

    register_avif = getattr(pillow_heif, "register_avif_opener", None)
    if register_avif is not None and not features.check("avif"):
        register_avif()
    return None


@functools.cache
def _avif_ready() -> bool:
    from PIL import features

    if features.check("avif"):
        return True
    if _heif_opener() is not None:  # this also registers pillow-heif's AVIF opener where it has one
        return False
    import pillow_heif

    return hasattr(pillow_heif, "register_avif_opener")


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def is_raw_name(name: str) -> bool:
    """Whether a file or key name is a camera RAW one, whatever its case."""
    return os.path.splitext(name)[1].lower() in RAW_EXTENSIONS


def raw_preview(data: bytes) -> tuple[bytes, int]:
    """The embedded preview of a camera RAW file as (JPEG or PNG bytes, EXIF orientation to apply);
    ValueError with the reason when rawpy is absent, the file unreadable or without a preview."""
    try:
        import rawpy  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ValueError("RAW needs rawpy (pip install 'clipsearch[local]' or pip install rawpy)") from None
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            flip = int(raw.sizes.flip)
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                raise ValueError("RAW file without an embedded JPEG preview") from None
    except rawpy.LibRawError:
        raise ValueError("not a camera RAW file rawpy can read (unsupported or corrupt)") from None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        return bytes(thumb.data), _FLIP_TO_ORIENTATION.get(flip, 1)
    height, width = np.shape(thumb.data)[:2]
    _check_size(width, height)  # before the bitmap is copied and encoded: LibRaw allows large ones
    buf = io.BytesIO()  # a bitmap preview (some older cameras): lossless PNG for the same decode
    Image.fromarray(np.asarray(thumb.data, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), _FLIP_TO_ORIENTATION.get(flip, 1)


def decode_for_model(data: bytes, max_side: int = MAX_SIDE, name: str = "") -> DecodedImage:
    """decode_image then downscale, keeping the original's upright size; ValueError with the reason.

    `name` (a file name or S3 key) says when the bytes are a camera RAW file (by its extension).
    """
    img, size, taken = _decode(data, max_side, name)
    return DecodedImage(downscale(img, max_side), *size, *taken)


def decode_image(data: bytes, max_side: int = MAX_SIDE) -> Image.Image:
    """Decode bytes into an upright RGB image of what the model can see; ValueError with the reason.

    The long side is centre-cropped to at most MAX_ASPECT times the short side, and a JPEG is decoded
    at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side stays >= max_side, so the work and
    the memory follow what downscale() keeps, not the file's pixel count. Sizes are checked from the
    header, before any pixel is decoded.
    """
    return _decode(data, max_side)[0]


def _decode(data: bytes, max_side: int, name: str = "") -> tuple[Image.Image, tuple[int, int], tuple[str | None, str]]:
    if not data:
        raise ValueError("empty image")
    turn = 1
    raw_taken: tuple[str | None, str] = (None, "")
    if name and is_raw_name(name):
        # The RAW file's own EXIF holds the capture time; camera previews usually carry none.
        raw_taken = read_capture_time(data)
        data, turn = raw_preview(data)
    elif _is_heif(data):
        missing = _heif_opener()
        if missing:
            raise ValueError(missing)
    elif data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis") and not _avif_ready():
        raise ValueError("AVIF needs Pillow 11.3 or later (or pillow-heif before 1.0)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            _check_size(width, height)
            img.seek(0)  # animated images: the first frame
            if min(width, height) >= 2 * max_side:
                # Only the scale matters: the short side asked for, the long side left free (1).
                img.draft("RGB", (max_side, 1) if width <= height else (1, max_side))
            img.load()
            exif = img.getexif()
            orientation = exif.get(_ORIENTATION_TAG) or turn
            taken = raw_taken if raw_taken[0] is not None else capture_time(exif)
            # Cropped in stored orientation, before the transpose copies the pixels: a centre crop is
            # the same whichever way the picture is turned (to the pixel, when the excess is odd).
            img = centre_crop(img)
            undo = _UNDO_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
            if undo is not None:
                img = img.transpose(undo)
            if orientation in (5, 6, 7, 8):  # turned a quarter: the upright size is the other way round
                width, height = height, width
            if img.mode in ("RGBA", "LA"):
                # Shrunk before compositing on white (resize premultiplies alpha: measured within 3/255
                # of compositing first): a 100 MP RGBA PNG then peaks at 0.8 GB instead of 1.6 GB.
                img = downscale(img, max_side)
            elif _converts_large(img):
                img = _convert_shrunk(img, max_side)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image too large (decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"corrupt or truncated image: {e}") from None
    return to_rgb(img), (width, height), taken


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ValueError(f"image too large: {width}x{height} pixels (limit {MAX_PIXELS:,})")
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"image too small: {width}x{height} pixels (the shorter side must be at least {MIN_SIDE})")


def centre_crop(img: Image.Image, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """The centre of img with the long side cut to at most max_aspect x the short side (CLIP's view)."""
    width, height = img.size
    if width > max_aspect * height:
        left = (width - max_aspect * height) // 2
        return img.crop((left, 0, left + max_aspect * height, height))
    if height > max_aspect * width:
        top = (height - max_aspect * width) // 2
        return img.crop((0, top, width, top + max_aspect * width))
    return img


_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")
# Rows converted at a time by _convert_shrunk: at the widest 2:1 picture under MAX_PIXELS (14142 x 7071),
# 256 rows of float32 working copies are ~30 MB.
_BAND_ROWS = 256


def _converts_large(img: Image.Image) -> bool:
    """Modes whose conversion for the model is bigger than the picture: palette with transparency (to
    RGBA, 4x) and high bit depth (float32 working copies, 8x a 16-bit picture)."""
    return img.mode in _HIGH_BIT_DEPTH or img.mode == "PA" or (img.mode == "P" and "transparency" in img.info)


def _convert_shrunk(img: Image.Image, max_side: int) -> Image.Image:
    """to_rgb's conversion of a palette-with-transparency or high-bit-depth picture, made band by band and
    box-reduced as it goes, so that the full-size converted picture never exists.

    The reduction factor is the one resize(reducing_gap=3.0) in downscale() would take, and box
    reduction works on whole factor x factor blocks, so the bands join without seams; downscale()
    then resamples what is left. Measured against converting at full size: within a few levels of 255.
    """
    short = min(img.size)
    factor = max(1, int(short / max_side / 3.0))
    if img.mode in _HIGH_BIT_DEPTH:
        # One scale for the whole picture, as to_rgb takes: its brightest pixel becomes 255.
        brightest = img.getextrema()[1]  # single-band modes: (min, max)
        top = float(brightest if isinstance(brightest, (int, float)) else brightest[1]) or 1.0

        def convert(band: Image.Image) -> Image.Image:
            arr = np.asarray(band, dtype=np.float32)
            return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")

        mode = "L"
    else:

        def convert(band: Image.Image) -> Image.Image:
            return band.convert("RGBA")

        mode = "RGBA"
    rows = factor * max(1, _BAND_ROWS // factor)
    width, height = img.size
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    for top_row in range(0, height, rows):
        band = convert(img.crop((0, top_row, width, min(height, top_row + rows))))
        out.paste(band.reduce(factor) if factor > 1 else band, (0, top_row // factor))
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white and high-bit-depth modes scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) or 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of what is RGB already


def downscale(img: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Centre-crop to at most MAX_ASPECT, then shrink so the shorter side is at most max_side."""
    img = centre_crop(img)
    short = min(img.size)
    if short <= max_side:
        return img
    scale = max_side / short
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


# -- model --------------------------------------------------------------------------------------


def _import_clip() -> Any:
    # clip-anytorch imports pkg_resources, whose deprecation warning would reach every user's terminal.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import clip
    return clip


def load_model(name: str, model_dir: str = "", encode_type: str | None = None) -> ClipModel:
    """Load a checkpoint file (in model_dir or a path) or a clip model name (downloaded/cached)."""
    clip = _import_clip()

    candidates = [os.path.join(model_dir, name), os.path.join(model_dir, name + ".pt"), name]
    path = next((c for c in candidates if c and os.path.isfile(c)), None)
    if path is None and name not in clip.available_models():
        raise ModelLoadError(
            f"unknown model {name!r}: use demo, a CLIP name ({', '.join(clip.available_models())}) or a checkpoint path"
        )
    try:
        with warnings.catch_warnings():
            # clip.load probes for a JIT archive first; torch's deprecation notice for that is noise here.
            warnings.simplefilter("ignore", FutureWarning)
            root = model_dir or os.path.expanduser("~/.cache/clip")
            model, preprocess = clip.load(path or name, device="cpu", jit=False, download_root=root)
    except OSError as e:  # urllib errors are OSErrors: offline and not cached
        raise ModelLoadError(
            f"model {name!r} is not cached and cannot be downloaded ({e.__class__.__name__}); "
            f"use --model demo or --model /path/to/{name.replace('/', '-')}.pt"
        ) from None
    except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"cannot load model {name!r}: not a CLIP checkpoint ({e})") from None
    return prepare_model(name, model, preprocess, encode_type)


def prepare_model(name: str, model: Any, preprocess: Any, encode_type: str | None = None) -> ClipModel:
    """Wrap a clip.model.CLIP for serving: eval mode, no autograd, text weights laid out for queries."""
    import torch

    if encode_type not in (None, "", TEXT, IMAGE):
        raise ModelLoadError(f"ENCODE_TYPE must be TEXT or IMAGE, not {encode_type!r}")
    model.eval()
    _lay_out_text_weights(model)
    torch.set_grad_enabled(False)
    return ClipModel(
        name=name,
        model=model,
        preprocess=preprocess,
        dim=int(model.text_projection.shape[1]),
        context_length=int(model.context_length),
        encode_type=encode_type or None,
    )


def encode_texts(clip_model: ClipModel, texts: list[str]) -> np.ndarray:
    """Unit-length text vectors; texts longer than the context are truncated."""
    import torch

    clip = _import_clip()

    tokens = clip.tokenize(texts, context_length=clip_model.context_length, truncate=True)
    with torch.inference_mode():
        features = _encode_text_to_eot(clip_model.model, tokens)
    return _normalise(features)


def _encode_text_to_eot(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's encode_text, run only up to the last end-of-text token in the batch.

    The text attention mask is causal and the output is pooled at the EOT token, so positions
    after it cannot change the result; skipping them is exact and much faster for short queries.
    The blocks are CLIP's ResidualAttentionBlock written out with its own modules and weights, with
    causal scaled-dot-product attention in place of nn.MultiheadAttention under CLIP's causal mask
    (the same function; its wrapper's reshapes and mask handling cost ~4% of a short query).
    """
    import torch
    from torch.nn.functional import linear, scaled_dot_product_attention

    eot = tokens.argmax(dim=-1)
    batch, length = tokens.shape[0], int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :length]).type(model.dtype)
    x = x + model.positional_embedding[:length].type(model.dtype)
    width = x.shape[-1]
    for block in model.transformer.resblocks:
        attn = block.attn
        heads = attn.num_heads
        qkv = linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        h = scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, width)
        x = x + attn.out_proj(h)
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x).type(model.dtype)
    return x[torch.arange(batch), eot] @ model.text_projection


def _lay_out_text_weights(model: Any) -> None:
    """Keep the text transformer's matrices transposed in memory: same values, same shapes.

    A short query is ~10 rows against 48 weight matrices, each read once per query; the GEMM reads a
    contiguous (K, N) operand faster than the (N, K) layout nn.Linear stores (~4% of an RN50 /
    ViT-B/32 text query on CPU, in an interleaved A/B within one process). clip's own modules
    compute the same values on these strided views.
    """
    for param in model.transformer.parameters():
        if param.dim() == 2:
            param.data = param.data.t().contiguous().t()


def encode_images(clip_model: ClipModel, images: list[Image.Image]) -> np.ndarray:
    """Unit-length image vectors, with CLIP's own preprocessing."""
    return encode_pixels(clip_model, preprocess_images(clip_model, images))


def preprocess_images(clip_model: ClipModel, images: list[Image.Image]) -> torch.Tensor:
    """CLIP's own preprocessing, as one (n, 3, size, size) batch; a pipeline can run it ahead of the model."""
    import torch

    return torch.stack([clip_model.preprocess(img) for img in images])


def encode_pixels(clip_model: ClipModel, batch: torch.Tensor) -> np.ndarray:
    """Unit-length vectors of images already preprocessed by preprocess_images()."""
    import torch

    tower = _image_tower(clip_model, len(batch))
    with torch.inference_mode():
        features = tower(batch.type(clip_model.model.dtype))
    return _normalise(features)


def prepare_graphs(clip_model: ClipModel) -> None:
    """Build the image graph now rather than after GRAPH_AFTER_IMAGES images (servers, benchmarks)."""
    _image_tower(clip_model, GRAPH_AFTER_IMAGES + 1)


def _image_tower(clip_model: ClipModel, batch_size: int) -> Any:
    """The visual tower to run. A ResNet on CPU becomes a frozen TorchScript graph once it has seen
    GRAPH_AFTER_IMAGES images: freezing folds batch norm into the convolutions and runs them with
    pre-packed oneDNN kernels, measured 1.4-1.8x faster for RN50 on CPU with the same vectors (1e-7).
    ViTs stay eager: their graph was slower.
    """
    tower = clip_model.graphs.get("visual")
    if tower is not None:
        return tower
    visual = clip_model.model.visual
    if type(visual).__name__ != "ModifiedResNet" or not _on_cpu(visual):
        clip_model.graphs["visual"] = visual
        return visual
    seen = clip_model.graphs["images_seen"] = clip_model.graphs.get("images_seen", 0) + batch_size
    if seen <= GRAPH_AFTER_IMAGES:
        return visual
    tower = clip_model.graphs["visual"] = _frozen_graph(visual)
    return tower


def _on_cpu(module: Any) -> bool:
    return all(p.device.type == "cpu" for p in module.parameters())


def _frozen_graph(tower: Any) -> Any:
    import torch

    size = int(tower.input_resolution)
    example = torch.zeros(1, 3, size, size, dtype=tower.conv1.weight.dtype)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice; the graph is still supported
        graph = torch.jit.trace(tower.eval(), example)
        return torch.jit.optimize_for_inference(torch.jit.freeze(graph.eval()))


def _normalise(features: Any) -> np.ndarray:
    arr = features.float().cpu().numpy().astype(np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.maximum(norms, 1e-12)).astype(np.float32)


# -- the SageMaker serving functions -------------------------------------------------------------


def model_fn(model_dir: str) -> ClipModel:
    """Load the model named by MODEL_NAME (a file in model_dir or a spec)."""
    if _VENDORED_MISMATCH is not None:
        raise ModelLoadError(_VENDORED_MISMATCH)
    name = os.environ.get("MODEL_NAME") or _single_checkpoint(model_dir) or DEFAULT_MODEL
    encode_type = (os.environ.get("ENCODE_TYPE") or "").strip().upper() or None
    model = load_model(name, model_dir, encode_type)
    if encode_type != TEXT:
        prepare_graphs(model)  # an endpoint lives long: pay the graph build at start, not mid-traffic
    return model


def _single_checkpoint(model_dir: str) -> str | None:
    try:
        found = sorted(f for f in os.listdir(model_dir) if f.endswith((".pt", ".pth")))
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


@_refusals_as_bad_input
def input_fn(body: bytes | str, content_type: str | None) -> dict[str, Any]:
    """Parse a request into {"kind": "text", "texts": [...]} or {"kind": "image", "images": [...]}."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in IMAGE_TYPES:
        data = body.encode("latin-1") if isinstance(body, str) else bytes(body)
        # Downscaled exactly as clipsearch does before encoding, so raw full-size images (a batch
        # transform over S3) give the same vectors as `clipsearch index`; a no-op on small images.
        return {"kind": IMAGE, "images": [downscale(decode_image(data))]}
    if ctype not in JSON_TYPES:
        raise ValueError(
            f"unsupported content type {content_type!r}; use application/json or one of " + ", ".join(IMAGE_TYPES)
        )
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise ValueError("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError('JSON body must be an object: {"inputs": [...]} or {"images": [...]}')
    has_text, has_images = "inputs" in payload, "images" in payload
    if has_text == has_images:
        raise ValueError('give exactly one of "inputs" (texts) or "images" (base64 images)')
    if has_text:
        texts = payload["inputs"]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError('"inputs" must be a string or a list of strings')
        if not texts:
            raise ValueError('"inputs" is empty')
        return {"kind": TEXT, "texts": texts}
    items = payload["images"]
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError('"images" must be a list of base64 strings')
    if not items:
        raise ValueError('"images" is empty')
    return {"kind": IMAGE, "images": [downscale(decode_image(_b64decode(i, n))) for n, i in enumerate(items)]}


def _b64decode(text: str, n: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"images[{n}] is not valid base64") from None


def predict_fn(data: dict[str, Any], model: ClipModel) -> np.ndarray:
    """Encode the parsed input; (n, dim) float32 unit vectors."""
    kind = data.get("kind")
    if model.encode_type is not None and kind != model.encode_type:
        raise BadInput(f"this endpoint encodes {model.encode_type.lower()} only, not {str(kind).lower()}")
    if kind == TEXT:
        return encode_texts(model, data["texts"])
    if kind == IMAGE:
        return encode_images(model, data["images"])
    raise BadInput(f"unknown input kind {kind!r}")


def output_fn(prediction: np.ndarray, accept: str | None) -> str:
    """JSON list of vectors."""
    ctype = (accept or "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "*/*", ""):
        raise BadInput(f"unsupported accept type {accept!r}; use application/json")
    return json.dumps(np.asarray(prediction, dtype=np.float32).tolist())
