"""Image batches on the device: augmentation levels, mixup/cutmix, normalization.

Augmentation runs on uint8 batches on whatever device they live on (the decoded images stay uint8 until the
last step); normalization comes last. Every random draw comes from the trial's generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from autoft.errors import AutoftError, closest
from autoft.recipe import AUGMENT_LEVELS

__all__ = ["augment", "mix", "normalize"]

# Random-resized-crop ranges for the "light" level (fraction of the area kept, width/height ratio).
_CROP_SCALE = (0.6, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)


def _check_batch(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise AutoftError(
            "Expected a uint8 image batch of shape (N, 3, H, W), but got "
            f"dtype {images.dtype} and shape {tuple(images.shape)}."
        )


def _light(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random-resized crop (back to the same size) per sample, in one grid_sample."""
    n = images.shape[0]
    g_device = generator.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=g_device)

    area = uniform(*_CROP_SCALE)
    log_ratio = uniform(math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / ratio).sqrt().clamp(max=1.0)
    x0 = uniform(0.0, 1.0) * (1.0 - w)
    y0 = uniform(0.0, 1.0) * (1.0 - h)
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)

    # Affine map from output coordinates in [-1, 1] to the crop window in input coordinates.
    theta = torch.zeros(n, 2, 3, device=g_device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


_TRIVIAL_AUGMENT = v2.TrivialAugmentWide()


def _strong(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light, then TrivialAugmentWide per sample, its global-RNG draws seeded from ``generator``."""
    out = _light(images, generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    # TrivialAugmentWide draws from torch's global CPU RNG; fork it so callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([_TRIVIAL_AUGMENT(img) for img in out])


def augment(images: torch.Tensor, level: str, *, generator: torch.Generator) -> torch.Tensor:
    """Augment a uint8 ``(N, 3, S, S)`` batch; same shape and dtype out, all randomness from ``generator``.

    Levels: ``"none"`` (input returned as is), ``"light"`` (random horizontal flip + random-resized crop,
    scale 0.6-1.0, ratio 3/4-4/3), ``"strong"`` (light + TrivialAugmentWide per sample).

    >>> g = torch.Generator().manual_seed(0)
    >>> augment(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "light", generator=g).shape
    torch.Size([2, 3, 16, 16])
    """
    if level not in AUGMENT_LEVELS:
        hint = closest(str(level), AUGMENT_LEVELS)
        raise AutoftError(
            f"Unknown augmentation level {level!r}; use one of {', '.join(AUGMENT_LEVELS)}"
            + (f" (did you mean {hint[0]!r}?)." if hint else ".")
        )
    _check_batch(images)
    if level == "none" or images.shape[0] == 0:
        return images
    if level == "light":
        return _light(images, generator)
    return _strong(images, generator)


def mix(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup: float,
    cutmix: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a normalized float batch with a shuffled copy of itself; returns inputs and soft targets.

    ``mixup`` / ``cutmix`` are the Beta(alpha, alpha) parameters (0 = off); with both on, each batch uses one of
    the two at random. Unlike timm's ``Mixup`` it takes batches of any size (an odd last batch included), and all
    randomness comes from ``generator``.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = mix(torch.zeros(3, 3, 8, 8), torch.tensor([0, 1, 2]), 3, mixup=0.2, cutmix=0.0, generator=g)
    >>> y.sum(1).tolist()
    [1.0, 1.0, 1.0]
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    rng = np.random.default_rng(seed)
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(len(inputs), generator=generator, device=generator.device).to(inputs.device)
    if use_cutmix:  # paste a box of area (1 - lam) from the partner image; lam becomes the exact kept share
        height, width = inputs.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = inputs.clone()
        mixed[:, :, y0:y1, x0:x1] = inputs[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        mixed = lam * inputs + (1.0 - lam) * inputs[perm]
    one_hot = F.one_hot(labels, num_classes).float()
    return mixed, lam * one_hot + (1.0 - lam) * one_hot[perm]


def normalize(images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` -> float32 ``(x / 255 - mean) / std``, computed on the images' device.

    >>> x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    >>> normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))[0, :, 0, 0].tolist()
    [1.0, 1.0, 1.0]
    """
    _check_batch(images)
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise AutoftError(
            f"mean and std need three values each (one per RGB channel) with std > 0, "
            f"but got mean={tuple(mean)} and std={tuple(std)}."
        )
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s
