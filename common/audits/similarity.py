"""SSIM / PSNR of each synthetic image to its nearest private image.

The method and the summary layout are described in the package docstring (:mod:`common.audits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common.audits.neighbors import nearest_neighbors


# --------------------------------------------------------------------------------------------------
# Similarity (SSIM / PSNR)
# --------------------------------------------------------------------------------------------------


def ssim_window(height: int, width: int) -> int:
    """SSIM window: 7 (scikit-image's default) or the largest odd size that fits a tiny image."""
    side = min(7, height, width)
    side = side if side % 2 == 1 else side - 1
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    return side


def _as_images(x: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) -> (N, C, H, W) float64."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be images shaped (N, C, H, W) or (N, H, W); got shape {np.shape(x)}")
    return arr


@dataclass
class SimilarityResult:
    """SSIM and PSNR (dB, capped) of each synthetic image (S,) to its nearest private image."""

    ssim: np.ndarray
    psnr: np.ndarray
    nn_index: np.ndarray
    identical: int
    psnr_cap: float
    win_size: int

    def summary(self, *, include_extremes: bool = True) -> dict:
        """Means and stds (and maxima with ``include_extremes``)."""
        out: dict = {}
        for key, vals in (("ssim", self.ssim), ("psnr", self.psnr)):
            out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
            if include_extremes:
                out[key]["max"] = float(np.max(vals))
        out.update({"identical": self.identical, "psnr_cap": self.psnr_cap, "win_size": self.win_size})
        return out


def similarity_to_nearest(
    synth: np.ndarray,
    private: np.ndarray,
    *,
    nn_index: np.ndarray | None = None,
    psnr_cap: float = 100.0,
    device: torch.device | str | None = None,
) -> SimilarityResult:
    """SSIM and PSNR of each synthetic image to its nearest (MSE) private image; images in [0, 1].

    ``nn_index`` (S,) skips the search when the caller already knows the nearest private image.
    """
    s_img, p_img = _as_images(synth, "synthetic images"), _as_images(private, "private images")
    if s_img.shape[1:] != p_img.shape[1:]:
        raise ValueError(f"image shapes differ: synthetic {s_img.shape[1:]} vs private {p_img.shape[1:]}")
    if nn_index is None:
        _, nn_index = nearest_neighbors(s_img, p_img, metric="mse", device=device)
    channels, height, width = s_img.shape[1:]
    win = ssim_window(height, width)
    ssim = np.empty(len(s_img))
    psnr = np.empty(len(s_img))
    identical = 0
    for i, j in enumerate(nn_index):
        a, b = s_img[i], p_img[j]
        if channels == 1:
            ssim[i] = structural_similarity(b[0], a[0], win_size=win, data_range=1.0)
        else:
            ssim[i] = structural_similarity(b, a, win_size=win, data_range=1.0, channel_axis=0)
        if np.array_equal(a, b):
            # skimage would return inf (and warn about a division by zero).
            identical += 1
            psnr[i] = psnr_cap
        else:
            psnr[i] = min(psnr_cap, peak_signal_noise_ratio(b, a, data_range=1.0))
    return SimilarityResult(ssim=ssim, psnr=psnr, nn_index=np.asarray(nn_index), identical=identical,
                            psnr_cap=psnr_cap, win_size=win)
