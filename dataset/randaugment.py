"""RandAugment on HWC uint8 numpy arrays with OpenCV/numpy re-implementations of the PIL operations,
as the original ALBEF code has them (every config uses N = 2 operations at magnitude 7 of 10).

Each `*_func` takes and returns an HWC uint8 array. `RandomAugment` draws its operations from the
global numpy RNG in the original's order: one `np.random.choice(augs, N)`, then per operation one
`np.random.random()` for the skip test (skipped when it is above 0.5) and, only if the operation is
applied and takes a sign (Shear, Translate, Rotate), one more for the sign.

AutoContrast follows the original code by default, whose uint8 arithmetic saturates every channel
whose minimum is above 0 (see `autocontrast_func`): ALBEF's released checkpoints were trained on
that. `RandomAugment(autocontrast='pil')` (config key `randaugment_autocontrast: pil`) stretches
each channel as PIL intends instead.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

MAX_LEVEL = 10
FILL = (128, 128, 128)  # grey fill of the geometric operations
TRANSLATE_CONST = 10    # pixels of translation at MAX_LEVEL
CUTOUT_CONST = 40       # cutout side (pixels) at MAX_LEVEL


# ---- operations ------------------------------------------------------------------------------

def identity_func(img: np.ndarray) -> np.ndarray:
    return img


def _apply_lut_per_channel(img: np.ndarray, tables: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty_like(img)
    for c, table in enumerate(tables):
        out[..., c] = table[img[..., c]]
    return out


def autocontrast_func(img: np.ndarray, cutoff: int = 0, faithful: bool = True) -> np.ndarray:
    """Per-channel min/max stretch through a LUT (after PIL `ImageOps.autocontrast`):
    scale = 255 / (max - min), LUT[v] = v * scale + offset, clipped to [0, 255] and truncated to
    uint8; the identity when max <= min.

    Args:
        cutoff: percent of pixels ignored at each end of the histogram (0: plain min and max).
        faithful: True (the default) computes offset = -min * scale as the original code does,
            with min a numpy uint8 scalar: the negation wraps to 256 - min, so a channel whose
            minimum is above 0 maps entirely to 255 and only channels with minimum 0 are
            stretched. False gives PIL's intended offset, -min * scale.
    """
    tables = []
    for c in range(img.shape[2]):
        ch = img[..., c]
        cut = cutoff * ch.size // 100
        if cut == 0:
            low, high = int(ch.min()), int(ch.max())
        else:
            hist = np.bincount(ch.ravel(), minlength=256)
            above_low = np.flatnonzero(np.cumsum(hist) > cut)
            low = int(above_low[0]) if above_low.size else 0
            above_high = np.flatnonzero(np.cumsum(hist[::-1]) > cut)
            high = 255 - int(above_high[0]) if above_high.size else 255
        if high <= low:
            table = np.arange(256, dtype=np.float64)
        else:
            scale = 255 / (high - low)
            negated_low = (-low) % 256 if faithful and cut == 0 else -low
            table = np.arange(256) * scale + negated_low * scale
        tables.append(table.clip(0, 255).astype(np.uint8))
    return _apply_lut_per_channel(img, tables)


def equalize_func(img: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation (PIL `ImageOps.equalize`).

    step = (sum of the non-zero bins except the last non-zero one) // 255; a channel with
    step 0 is left unchanged; otherwise LUT[v] = (step // 2 + sum(hist[:v])) // step, clipped to 255.
    """
    out = img.copy()
    for c in range(img.shape[2]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        non_zero = hist[hist != 0]
        step = int(non_zero[:-1].sum()) // 255
        if step == 0:
            continue
        shifted = np.empty_like(hist)
        shifted[0] = step // 2
        shifted[1:] = hist[:-1]
        table = (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)
        out[..., c] = table[ch]
    return out


def brightness_func(img: np.ndarray, factor: float) -> np.ndarray:
    """Multiply by `factor` through a float32 LUT, clipped and truncated to uint8."""
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def _wrap_to_uint8(x: np.ndarray) -> np.ndarray:
    """Float to uint8 the way the original platform cast it: truncate toward zero, then mod 256."""
    return np.mod(np.trunc(x).astype(np.int64), 256).astype(np.uint8)


def sharpness_func(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a 3x3 smoothed copy on the interior; border pixels keep their values.

    Parity: the blend is cast to uint8 without clipping, so values outside [0, 255] wrap
    (-7.2 -> 249, 311.5 -> 55) instead of saturating.
    """
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    degenerate = cv2.filter2D(img, -1, kernel)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    inner = degenerate.astype(np.float32)[1:-1, 1:-1]
    out[1:-1, 1:-1] = inner + factor * (out[1:-1, 1:-1] - inner)
    return _wrap_to_uint8(out)


def _warp(img: np.ndarray, matrix: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    height, width = img.shape[:2]
    return cv2.warpAffine(img, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(fill)).astype(np.uint8)


def shear_x_func(img: np.ndarray, factor: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    return _warp(img, np.float32([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y_func(img: np.ndarray, factor: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    return _warp(img, np.float32([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x_func(img: np.ndarray, offset: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    return _warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y_func(img: np.ndarray, offset: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    return _warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]), fill)


def rotate_func(img: np.ndarray, degree: float, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Rotate by `degree` (counter-clockwise) about (W/2, H/2), bilinear, constant fill."""
    height, width = img.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degree, 1)
    return _warp(img, matrix, fill)


# The five operations below are not used by any config. They follow PIL's semantics on RGB input.

def solarize_func(img: np.ndarray, thresh: int = 128) -> np.ndarray:
    """Invert every value >= thresh."""
    values = np.arange(256)
    table = np.where(values < thresh, values, 255 - values).astype(np.uint8)
    return table[img]


def color_func(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image (ITU-R 601-2 luma); factor 0 is grey, 1 the input."""
    gray = img.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    out = gray[..., None] + factor * (img.astype(np.float32) - gray[..., None])
    return out.clip(0, 255).astype(np.uint8)


def contrast_func(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level; factor 0 is flat grey, 1 the input."""
    mean = float((img.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])).mean())
    table = ((np.arange(256) - mean) * factor + mean).clip(0, 255).astype(np.uint8)
    return table[img]


def posterize_func(img: np.ndarray, bits: int) -> np.ndarray:
    """Keep the `bits` most significant bits of every value."""
    mask = np.uint8((0xFF << (8 - int(bits))) & 0xFF)
    return np.bitwise_and(img, mask)


def cutout_func(img: np.ndarray, pad_size: int, fill: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Fill a square of side about `pad_size` at a random centre (two `np.random.random()` draws)."""
    height, width = img.shape[:2]
    rel_y, rel_x = np.random.random(2)
    half = pad_size // 2
    cy, cx = int(rel_y * height), int(rel_x * width)
    out = img.copy()
    out[max(cy - half, 0):min(cy + half, height), max(cx - half, 0):min(cx + half, width)] = fill
    return out


def pil_autocontrast_func(img: np.ndarray) -> np.ndarray:
    """AutoContrast as PIL intends it: every channel stretched to [0, 255]."""
    return autocontrast_func(img, faithful=False)


# ---- level -> arguments ----------------------------------------------------------------------

def _no_args(level: float) -> tuple:
    return ()


def _enhance_args(level: float) -> tuple:
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


def _signed(value: float, flip: bool, fill: Sequence[int]) -> tuple:
    return (-value if flip else value, fill)


def _shear_args(level: float) -> tuple:
    value = (level / MAX_LEVEL) * 0.3
    return _signed(value, np.random.random() > 0.5, FILL)


def _translate_args(level: float) -> tuple:
    value = (level / MAX_LEVEL) * float(TRANSLATE_CONST)
    return _signed(value, np.random.random() > 0.5, FILL)


def _rotate_args(level: float) -> tuple:
    value = (level / MAX_LEVEL) * 30
    return _signed(value, np.random.random() < 0.5, FILL)  # Parity: rotate flips on < 0.5


def _solarize_args(level: float) -> tuple:
    return (int((level / MAX_LEVEL) * 256),)


def _posterize_args(level: float) -> tuple:
    return (int((level / MAX_LEVEL) * 4),)


def _cutout_args(level: float) -> tuple:
    return (int((level / MAX_LEVEL) * CUTOUT_CONST), FILL)


# name -> (operation, level -> arguments). The order is the one used when `augs` is empty.
OPS: dict[str, tuple[Callable[..., np.ndarray], Callable[[float], tuple]]] = {
    'Identity': (identity_func, _no_args),
    'AutoContrast': (autocontrast_func, _no_args),
    'Equalize': (equalize_func, _no_args),
    'Rotate': (rotate_func, _rotate_args),
    'Solarize': (solarize_func, _solarize_args),
    'Color': (color_func, _enhance_args),
    'Contrast': (contrast_func, _enhance_args),
    'Brightness': (brightness_func, _enhance_args),
    'Sharpness': (sharpness_func, _enhance_args),
    'ShearX': (shear_x_func, _shear_args),
    'TranslateX': (translate_x_func, _translate_args),
    'TranslateY': (translate_y_func, _translate_args),
    'Posterize': (posterize_func, _posterize_args),
    'ShearY': (shear_y_func, _shear_args),
    'Cutout': (cutout_func, _cutout_args),
}


# how AutoContrast stretches: the original code's (the default) or PIL's
AUTOCONTRAST_MODES = ('original', 'pil')


class RandomAugment:
    """Apply `N` operations drawn with replacement from `augs`, each with probability 0.5, at
    magnitude `M` (of 10).

    Args:
        N: operations drawn per image.
        M: magnitude level, 0..10.
        isPIL: convert a PIL image to an HWC uint8 array first (otherwise an array is expected).
        augs: operation names (keys of `OPS`); empty means all of them.
        autocontrast: 'original' (default: the original code's AutoContrast, which saturates
            channels whose minimum is above 0) or 'pil' (PIL's per-channel stretch).
    Returns (from `__call__`): the augmented HWC uint8 numpy array.
    """

    def __init__(self, N: int = 2, M: float = 10, isPIL: bool = False, augs: Sequence[str] = (),
                 autocontrast: str = 'original') -> None:
        unknown = [name for name in augs if name not in OPS]
        if unknown:
            raise ValueError(f'unknown RandomAugment operation(s) {unknown}; known: {list(OPS)}')
        if autocontrast not in AUTOCONTRAST_MODES:
            raise ValueError(f"RandomAugment autocontrast must be one of {', '.join(AUTOCONTRAST_MODES)}, "
                             f'got {autocontrast!r}')
        self.autocontrast = autocontrast
        self.N = N
        self.M = M
        self.isPIL = isPIL
        self.augs = list(augs) if augs else list(OPS)

    def get_random_ops(self) -> list[tuple[str, float, float]]:
        """(name, probability, level) for the `N` drawn operations."""
        return [(str(name), 0.5, self.M) for name in np.random.choice(self.augs, self.N)]

    def __call__(self, img: np.ndarray | Image.Image) -> np.ndarray:
        if self.isPIL:
            img = np.array(img)
        for name, prob, level in self.get_random_ops():
            if np.random.random() > prob:
                continue
            func, level_to_args = OPS[name]
            if name == 'AutoContrast' and self.autocontrast == 'pil':
                func = pil_autocontrast_func
            img = func(img, *level_to_args(level))
        return img

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(N={self.N}, M={self.M}, isPIL={self.isPIL}, augs={self.augs}, '
                f'autocontrast={self.autocontrast!r})')
