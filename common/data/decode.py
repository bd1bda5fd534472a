"""Decoding image files (PNG, JPEG, BMP; any PIL mode) into (N, C, H, W) float32 arrays."""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image

from common.data.dataset import DataError, NoRecords
from common.data.tree import _ImageFile

# --------------------------------------------------------------------------------------------
# Decoding image files
# --------------------------------------------------------------------------------------------

_GRAY_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_l_or_rgb(img: Image.Image, channels: int | None) -> Image.Image:
    """Convert any PIL mode to 'L' or 'RGB' (alpha dropped); force ``channels`` if given."""
    mode = img.mode
    if mode in _GRAY_16BIT:
        # 16-bit grayscale PNG: scale 0..65535 to 0..255 (PIL's own convert would clip instead).
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    elif mode in ("1", "L", "LA", "F"):
        img = img.convert("L")
    elif mode in ("P", "PA"):
        rgb = img.convert("RGB")
        a = np.asarray(rgb)
        # A palette of grays is a grayscale image for the automatic channel choice.
        is_gray = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
        img = Image.fromarray(np.ascontiguousarray(a[..., 0])) if is_gray else rgb
    elif mode != "RGB":
        img = img.convert("RGB")  # RGBA, CMYK, YCbCr, ...
    if channels == 1 and img.mode == "RGB":
        img = img.convert("L")
    elif channels == 3 and img.mode == "L":
        img = img.convert("RGB")
    return img


def _decode_image(f: _ImageFile, image_size: int | None, channels: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one file -> (uint8 (H, W) or (H, W, 3), original (width, height))."""
    try:
        with Image.open(io.BytesIO(f.data) if isinstance(f.data, bytes) else f.data) as img:
            size = img.size
            out = _to_l_or_rgb(img, channels)
            if image_size is not None and out.size != (image_size, image_size):
                # PIL's bilinear resize widens its kernel when shrinking, i.e. it antialiases.
                out = out.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(out), size
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL picks a decoder by the content, and its rarer ones raise anything
        # (NotImplementedError, AttributeError, TypeError on a damaged file named .png: review s59)
        raise DataError(
            f"cannot decode image {f.name}: {exc}; the file is corrupt or not an image: replace or delete it"
        ) from exc


def _decode_files(files: Sequence[_ImageFile], image_size: int | None, channels: int | None,
                  skip_unreadable: bool = False) -> tuple[np.ndarray, list[int]]:
    """Decode files into (N, C, H, W) float32 in [0, 1], checking that sizes agree; returns the images and the indices
    of the files they come from. ``skip_unreadable``: a file that does not decode is left out, with a warning,
    instead of an error (a site's loader: see ``load_dataset``)."""
    if not files:
        raise NoRecords("no images to load: the dataset (or this split of it) is empty")
    arrays: list[np.ndarray] = []
    kept: list[int] = []
    unreadable: list[str] = []
    first_name, first_size = "", (0, 0)
    with warnings.catch_warnings():
        if skip_unreadable:  # (a site's loader) an image past PIL's pixel warning is decoded on every request, free
            # query.info included, and can outgrow the site's memory: it is no record (review s59)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        for index, f in enumerate(files):
            try:
                arr, size = _decode_image(f, image_size, channels)
            except DataError:
                if not skip_unreadable:
                    raise
                unreadable.append(f.name)
                continue
            if image_size is None:
                if not arrays:
                    first_name, first_size = f.name, size
                elif size != first_size:
                    raise DataError(
                        f"images have different sizes: {first_name} is {first_size[0]}x{first_size[1]} but "
                        f"{f.name} is {size[0]}x{size[1]}; pass image_size (e.g. image_size=32) to resize "
                        "every image to the same square size"
                    )
            arrays.append(arr)
            kept.append(index)
    if unreadable:
        warnings.warn(f"skipped {len(unreadable)} files that are not readable images (e.g. {unreadable[:3]}): "
                      "incomplete copies or corrupt files; they are not records until they can be read", stacklevel=3)
    if not arrays:
        raise NoRecords(f"no readable images to load ({len(unreadable)} files could not be decoded, e.g. "
                        f"{unreadable[:3]})")
    c = channels or (3 if any(a.ndim == 3 for a in arrays) else 1)
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), c, h, w), dtype=np.float32)
    for i, a in enumerate(arrays):
        # (H, W, 3) -> (3, H, W); a grayscale (H, W) broadcasts over the channels, which is
        # what PIL's L -> RGB conversion does too.
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a
    return np.divide(out, 255.0, out=out), kept
