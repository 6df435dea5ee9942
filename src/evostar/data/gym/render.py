"""Pixels of the gym: handwritten-digit strips and bar charts, in an in-distribution and a
shifted (out-of-distribution) style.

Every image is exactly ``IMAGE_WIDTH`` x ``IMAGE_HEIGHT`` RGB so that a tiny vision tower
always sees the same number of image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

CELL = 28
"""Side of one digit cell / one bar column, in pixels."""
N_CELLS = 3
IMAGE_WIDTH = CELL * N_CELLS
IMAGE_HEIGHT = CELL
BAR_UNIT_PX = 3
"""Pixels per unit of bar height (heights 1..9 -> 3..27 px)."""
MAX_BAR_HEIGHT = (IMAGE_HEIGHT - 1) // BAR_UNIT_PX

POOL_SEED = 20_240_917
"""Fixed seed of the train/eval split of the digit images: independent of the user's seed so
that every gym built on this machine keeps test handwriting out of training."""
EVAL_FRACTION = 0.2


# ----------------------------------------------------------------------------- digit pools


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] with values 0..16, labels [1797]) from scikit-learn (offline)."""
    from sklearn.datasets import load_digits  # lazy: sklearn's import is slow

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digit_label(index: int) -> int:
    """True label of digit image ``index`` of ``load_digits()``."""
    return int(_digits()[1][index])


@lru_cache(maxsize=1)
def digit_pools() -> dict[str, dict[int, np.ndarray]]:
    """Stratified 80/20 split of the digit images: ``{"train"|"eval": {label: indices}}``.

    The train pool feeds the seed and train splits, the eval pool val/test only, so evaluation
    always reads unseen handwriting.
    """
    _, labels = _digits()
    rng = np.random.default_rng(POOL_SEED)
    pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "eval": {}}
    for label in range(10):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        n_eval = int(round(EVAL_FRACTION * len(idx)))
        pools["eval"][label] = np.sort(idx[:n_eval])
        pools["train"][label] = np.sort(idx[n_eval:])
    for pool in pools.values():
        for arr in pool.values():
            arr.setflags(write=False)
    return pools


@lru_cache(maxsize=1)
def _eval_mask() -> np.ndarray:
    mask = np.zeros(len(_digits()[1]), dtype=bool)
    for idx in digit_pools()["eval"].values():
        mask[idx] = True
    return mask


def pool_of(index: int) -> str:
    """Which pool ("train" or "eval") digit image ``index`` belongs to."""
    return "eval" if _eval_mask()[index] else "train"


# ----------------------------------------------------------------------------- styles


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _lerp_rgb(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, ...]:
    return tuple(int(round(_lerp(x, y, t))) for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class DigitStyle:
    """How handwritten digits are drawn into their 28x28 cells."""

    scale_min: float = 1.0
    """Digit side as a fraction of the cell (drawn uniformly in [scale_min, scale_max])."""
    scale_max: float = 1.0
    jitter_px: int = 0
    """Maximum random offset of the digit from the cell centre, in pixels (each axis)."""
    noise_std: float = 0.0
    """Std of additive gaussian pixel noise (0..255 scale)."""
    ink: float = 1.0
    """Darkness of full-intensity strokes: 1.0 = black, 0.7 = gray."""

    @classmethod
    def ood(cls, strength: float = 1.0) -> DigitStyle:
        """Shifted style for test_ood; ``strength`` 0 equals the default style, 1 is the
        full shift (smaller, off-centre, noisy, lighter digits: still easy for a human)."""
        s = float(strength)
        return cls(
            scale_min=1.0 - 0.25 * s,
            scale_max=1.0 - 0.05 * s,
            jitter_px=int(round(3 * s)),
            noise_std=12.0 * s,
            ink=1.0 - 0.3 * s,
        )

    @property
    def is_plain(self) -> bool:
        return self == DigitStyle()


@dataclass(frozen=True)
class BarStyle:
    """How bar charts are drawn."""

    bar_width: int = 20
    """Width of each bar inside its 28-px column."""
    bar_rgb: tuple[int, int, int] = (40, 40, 40)
    background_rgb: tuple[int, int, int] = (255, 255, 255)
    baseline_rgb: tuple[int, int, int] = (0, 0, 0)
    grid_rgb: tuple[int, int, int] | None = None
    """Colour of horizontal gridlines every 3 height units (None: no gridlines)."""

    @classmethod
    def ood(cls, strength: float = 1.0) -> BarStyle:
        """Shifted style for test_ood: blue, narrower bars on a cream background with light
        gridlines; ``strength`` 0 equals the default style."""
        s = float(strength)
        base = cls()
        bg = _lerp_rgb(base.background_rgb, (250, 246, 232), s)
        return cls(
            bar_width=max(4, int(round(_lerp(base.bar_width, 10, s)))),
            bar_rgb=_lerp_rgb(base.bar_rgb, (40, 90, 200), s),  # type: ignore[arg-type]
            background_rgb=bg,  # type: ignore[arg-type]
            baseline_rgb=base.baseline_rgb,
            grid_rgb=_lerp_rgb(bg, (200, 200, 200), s) if s > 0 else None,  # type: ignore[arg-type]
        )


# ----------------------------------------------------------------------------- digit strips


def _resize_ink(image8: np.ndarray, size: int) -> np.ndarray:
    """8x8 values 0..16 -> size x size ink in [0, 1] (bicubic)."""
    small = Image.fromarray(np.round(image8 * (255.0 / 16.0)).astype(np.uint8))
    big = small.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255.0


@lru_cache(maxsize=4096)
def _plain_cell(index: int) -> np.ndarray:
    arr = _resize_ink(_digits()[0][index], CELL)
    arr.setflags(write=False)
    return arr


def _styled_cell(index: int, style: DigitStyle, rng: np.random.Generator) -> np.ndarray:
    scale = rng.uniform(style.scale_min, style.scale_max)
    size = int(np.clip(round(CELL * scale), 4, CELL))
    ink = _resize_ink(_digits()[0][index], size)
    cell = np.zeros((CELL, CELL), dtype=np.float32)
    free = CELL - size
    j = style.jitter_px
    y = int(np.clip(free // 2 + rng.integers(-j, j + 1), 0, free))
    x = int(np.clip(free // 2 + rng.integers(-j, j + 1), 0, free))
    cell[y : y + size, x : x + size] = ink
    return cell


def render_digits(
    indices: list[int], style: DigitStyle | None = None, rng: np.random.Generator | None = None
) -> Image.Image:
    """A strip of three ``load_digits`` images (dark ink on white), 84x28 RGB.

    ``rng`` drives the random parts of a non-default style (required for those).
    """
    if len(indices) != N_CELLS:
        raise ValueError(f"a strip holds {N_CELLS} digits, got {len(indices)}")
    style = style or DigitStyle()
    plain = style.is_plain
    if not plain and rng is None:
        raise ValueError("a randomised digit style needs an rng")
    cells = [
        _plain_cell(i) if plain else _styled_cell(i, style, rng)  # type: ignore[arg-type]
        for i in indices
    ]
    ink = np.concatenate(cells, axis=1)
    pixels = 255.0 * (1.0 - style.ink * ink)
    if style.noise_std > 0:
        pixels = pixels + rng.normal(0.0, style.noise_std, size=pixels.shape)  # type: ignore[union-attr]
    gray = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


# ----------------------------------------------------------------------------- bar charts


def render_bars(heights: list[int], style: BarStyle | None = None) -> Image.Image:
    """A bar chart of three bars, one per 28-px column, bar k filling ``3 * heights[k]`` pixel
    rows from the bottom, 84x28 RGB."""
    if len(heights) != N_CELLS:
        raise ValueError(f"a chart holds {N_CELLS} bars, got {len(heights)}")
    style = style or BarStyle()
    arr = np.empty((IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
    arr[:] = style.background_rgb
    if style.grid_rgb is not None:
        for level in range(3, MAX_BAR_HEIGHT + 1, 3):
            arr[IMAGE_HEIGHT - BAR_UNIT_PX * level] = style.grid_rgb
    width = min(style.bar_width, CELL)
    for k, h in enumerate(heights):
        if not 1 <= h <= MAX_BAR_HEIGHT:
            raise ValueError(f"bar height must be in 1..{MAX_BAR_HEIGHT}, got {h}")
        x0 = CELL * k + (CELL - width) // 2
        arr[IMAGE_HEIGHT - BAR_UNIT_PX * h :, x0 : x0 + width] = style.bar_rgb
    arr[IMAGE_HEIGHT - 1] = style.baseline_rgb
    return Image.fromarray(arr)
