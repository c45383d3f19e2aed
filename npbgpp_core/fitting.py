"""The per-scene recipes NPBG and coefficients_ft: their optimisers and step loss, shared
by the plain-PyTorch fitting loops here (the demo and the add-on) and the headless
trainer's Lightning systems (headless_train/systems/npbg.py, coefficients_ft.py).

- :func:`fit_coefficients`: coefficients_ft: the 56 NPBG++ coefficients per point become
  learnable descriptors of an NPBG model with the NPBG++ basis MLP frozen; RMSprop on the
  coefficients (lr 0.01 by default here, published 0.1: see the function), Adam (lr 1e-4)
  on the refiner, L1 at full, 1/2 and 1/4 resolution (:func:`coefficients_ft_loss`).
- :func:`fit_npbg`: NPBG: descriptors start at zero, RMSprop (lr 0.1) on descriptors +
  background, Adam (lr 1e-4) on a refiner that starts from pretrained weights.

Both train on random ``crop`` x ``crop`` windows of the given views (one per step) for a
fixed number of steps and report the losses and seconds taken. One step of either recipe
is :func:`npbg_step_loss` with :func:`npbg_optimizers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .camera import Camera
from .losses import multiscale_l1
from .models import NPBG, NPBGConfig, NPBGPlusPlus
from .models.aggregator import AggregatedScene

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class FitViews:
    """Training views: images (K, 3, H, W) in [0, 1], one camera each, optional masks
    (K, 1, H, W) of valid pixels (pixels outside never contribute to the loss)."""

    images: torch.Tensor
    cameras: list[Camera]
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (K, 3, H, W), got {tuple(self.images.shape)}")
        if len(self.cameras) != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {len(self.cameras)} cameras")
        if self.masks is not None and (self.masks.shape[0] != self.images.shape[0] or self.masks.shape[1] != 1):
            raise ValueError(f"masks must be (K, 1, H, W), got {tuple(self.masks.shape)}")
        if not self.cameras:
            raise ValueError("fitting needs at least one view")


@dataclass
class FitResult:
    """The fitted model, the loss of every step and the wall time."""

    model: NPBG
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)


def as_fit_views(views: FitViews | tuple | Sequence) -> FitViews:
    """Accept FitViews or a tuple (images, cameras[, masks])."""
    if isinstance(views, FitViews):
        return views
    return FitViews(*views)


def random_crop(
    views: FitViews, rng: np.random.Generator, crop: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, Camera]:
    """One random view's random ``crop`` x ``crop`` window (the whole image when ``crop`` is
    None or not smaller): image (1, 3, h, w), mask (1, 1, h, w) or None, its camera."""
    k = int(rng.integers(len(views.cameras)))
    image, camera = views.images[k], views.cameras[k]
    mask = None if views.masks is None else views.masks[k]
    h, w = image.shape[-2:]
    ch, cw = (h, w) if crop is None else (min(crop, h), min(crop, w))
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    if (ch, cw) != (h, w):
        image = image[:, top : top + ch, left : left + cw]
        mask = None if mask is None else mask[:, top : top + ch, left : left + cw]
        camera = camera.cropped(top, left, ch, cw)
    return image[None], (None if mask is None else mask[None]), camera


def npbg_optimizers(
    descriptor_params: Iterable[torch.nn.Parameter], refiner_params: Iterable[torch.nn.Parameter],
    lr_descriptors: float, lr_refiner: float,
) -> tuple[torch.optim.RMSprop, torch.optim.Adam]:
    """The optimisers of the NPBG recipes: RMSprop on the per-point descriptors (or
    coefficients) and background, Adam on the refiner's trainable parameters."""
    rms = torch.optim.RMSprop(list(descriptor_params), lr=lr_descriptors)
    adam = torch.optim.Adam([p for p in refiner_params if p.requires_grad], lr=lr_refiner)
    return rms, adam


def npbg_step_loss(
    model: NPBG, points: torch.Tensor, camera: Camera, target: torch.Tensor, mask: torch.Tensor | None,
    loss_fn: LossFn,
) -> torch.Tensor:
    """One training step's loss of the NPBG recipes: ``model``'s raw (unclamped) RGB from
    ``camera`` against ``target`` (1, 3, h, w) with ``mask`` (1, 1, h, w) or None."""
    pred = model.render_raw(points, camera)[:3].unsqueeze(0)
    return loss_fn(pred, target, mask)


def coefficients_ft_loss(factors: Sequence[int] = (1, 2, 4)) -> LossFn:
    """coefficients_ft's loss: masked L1 at full resolution and at 1/f for each factor f."""
    factors = tuple(int(f) for f in factors)
    return lambda p, t, m: multiscale_l1(p, t, m, factors)


def _fit_loop(
    model: NPBG, points: torch.Tensor, views: FitViews, steps: int, crop: int | None, loss_fn: LossFn,
    lr_descriptors: float, lr_refiner: float, seed: int, device: torch.device,
) -> FitResult:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rng = np.random.default_rng(seed)
    rms, adam = npbg_optimizers(model.descriptor_parameters(), model.refiner.parameters(), lr_descriptors, lr_refiner)
    result = FitResult(model)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        image, mask, camera = random_crop(views, rng, crop)
        image = image.to(device)
        mask = None if mask is None else mask.to(device)
        loss = npbg_step_loss(model, points, camera.to(device), image, mask, loss_fn)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"fitting loss became {float(loss)} at step {result.steps}")
        rms.zero_grad(set_to_none=True)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        rms.step()
        adam.step()
        result.losses.append(float(loss.detach()))
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def fit_coefficients(
    model: NPBGPlusPlus,
    aggregated: AggregatedScene,
    views: FitViews | tuple,
    steps: int = 100,
    crop: int | None = 128,
    lr_coefficients: float = 0.01,
    lr_refiner: float = 1e-4,
    loss_fn: LossFn | None = None,
    loss_factors: Sequence[int] = (1, 2, 4),
    seed: int = 0,
) -> FitResult:
    """coefficients_ft: fine-tune ``aggregated``'s coefficients and a copy of ``model``'s
    refiner on ``views`` for ``steps`` steps; ``model`` itself is not changed. The result's
    ``.model`` is an :class:`NPBG` rendering with ``render(aggregated.points, camera)``.
    With an environment background (``background='environment'``) the scene's map
    becomes a learnable tensor of that model, optimised with the coefficients.

    ``lr_coefficients`` defaults to 0.01, not the published 0.1 (``headless_train``'s
    ``system=coefficients_ft`` keeps 0.1 for its 40k-step runs): the coefficients start
    from the aggregated values, and RMSprop's first steps move every touched value by about
    10 x lr, which at 0.1 undoes much of the aggregation in a short fit. Measured on the
    demo scene, 200 steps: 0.1 gives 27.8 dB / SSIM 0.903 (below the unfitted 0.936),
    0.01 gives 29.0 dB / 0.943."""
    views = as_fit_views(views)
    device = model.device
    if model.basis is None:
        raise ValueError("coefficient fine-tuning needs an NPBG++ model with the 'sphere' aggregator")
    npbg = NPBG.from_npbgpp_coefficients(
        aggregated.points.detach().cpu(), aggregated.coefficients.detach().cpu(),
        {k: v.detach().cpu() for k, v in model.basis.state_dict().items()},
        {k: v.detach().cpu() for k, v in model.refiner.state_dict().items()},
        model.config, valid=aggregated.valid.detach().cpu(),
        background=None if aggregated.background is None else aggregated.background.detach().cpu(),
    ).to(device)
    loss = loss_fn or coefficients_ft_loss(loss_factors)
    points = aggregated.points.detach().to(device, torch.float32)
    return _fit_loop(npbg, points, views, steps, crop, loss, lr_coefficients, lr_refiner, seed, device)


def fit_npbg(
    points: torch.Tensor,
    views: FitViews | tuple,
    refiner_state: dict[str, torch.Tensor] | None,
    steps: int = 100,
    crop: int | None = 128,
    config: NPBGConfig | dict | None = None,
    lr_descriptors: float = 0.1,
    lr_refiner: float = 1e-4,
    loss_fn: LossFn | None = None,
    loss_factors: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FitResult:
    """NPBG: zero-initialised descriptors and background for ``points``, the refiner from
    ``refiner_state`` (None: random init), fitted on ``views`` for ``steps`` steps.
    The default loss is the same multi-scale L1 as :func:`fit_coefficients` (so that a
    fixed budget compares the two fairly; the published NPBG uses a VGG loss)."""
    views = as_fit_views(views)
    points = torch.as_tensor(points, dtype=torch.float32)
    model = NPBG(points.shape[0], config)
    if refiner_state is not None:
        try:
            model.refiner.load_state_dict(refiner_state)
        except RuntimeError as exc:
            raise ValueError(f"refiner weights do not fit the NPBG refiner: {str(exc).splitlines()[0]}") from exc
    device = torch.device(device)
    model.to(device)
    loss = loss_fn or coefficients_ft_loss(loss_factors)
    return _fit_loop(model, points.to(device), views, steps, crop, loss, lr_descriptors, lr_refiner, seed, device)
