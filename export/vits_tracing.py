"""Trace-friendly stand-ins for the parts of transformers' VITS that the ONNX exporter
cannot convert, applied only while exporting.

Every `facebook/mms-tts-*` checkpoint (transformers' default `VitsConfig`) has a
stochastic duration predictor with four spline flows; inverted, it keeps three of them
(`VitsStochasticDurationPredictor.forward`, reverse), each running
`_unconstrained_rational_quadratic_spline`. That function picks the inputs inside the
spline's tail bound with a boolean mask (`inputs[inside]`, a shape that depends on the
data), and the spline it calls asserts on data with `torch_compilable_check`
(`inputs.min() >= lower`, `torch.all(discriminant >= 0)`). Traced by `torch.export`, the
asserts become `aten._is_all_true`, which has no ONNX translation, so the export fails.
Checkpoints with a single duration flow never reach the spline when inverted (only the
affine flow is kept), which is why small test configurations export.

`traceable_splines()` swaps that one module global for `spline`, which computes the same
values without masks or asserts: it runs the spline on every element, with the elements
outside the bound clamped onto it, and keeps the identity (log-determinant 0) for those
outside with `torch.where`. Inside the bound the arithmetic is the original's, element by
element. The one difference is where the original would refuse: a discriminant rounded
below zero is taken as zero (the double root) instead of raising, since a graph cannot
raise. `self_check` compares the two functions on random inputs, inside and outside the
bound, in both directions, so a transformers release that changes the original stops the
export instead of exporting something else. transformers itself is not edited: the swap
lasts for the `with` block only (one export at a time per process).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from nearvoice.export.errors import UnsupportedArchitecture

MODULE = "transformers.models.vits.modeling_vits"
TARGET = "_unconstrained_rational_quadratic_spline"
CHECK_TOLERANCE = 1e-4
"""Largest difference (absolute, and relative to the value) the self-check accepts: float32
kernels over differently shaped tensors may round the last bits differently."""


def spline(
    inputs: Any,
    unnormalized_widths: Any,
    unnormalized_heights: Any,
    unnormalized_derivatives: Any,
    reverse: bool = False,
    tail_bound: float = 5.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Any, Any]:
    """transformers' `_unconstrained_rational_quadratic_spline` (same arguments, same
    results) in operations whose shapes do not depend on the data."""
    import torch
    from torch import nn

    num_bins = unnormalized_widths.shape[-1]
    if min_bin_width * num_bins > 1.0 or min_bin_height * num_bins > 1.0:
        raise ValueError(f"minimal bin width or height too large for {num_bins} bins")
    upper, lower = tail_bound, -tail_bound
    inside = (inputs >= lower) & (inputs <= upper)
    # The original pads with zeros and then writes this constant into both ends.
    constant = float(math.log(math.exp(1 - min_derivative) - 1))
    padded = nn.functional.pad(unnormalized_derivatives, pad=(1, 1), value=constant)
    x = torch.clamp(inputs, lower, upper)

    widths = nn.functional.softmax(unnormalized_widths, dim=-1)
    widths = min_bin_width + (1 - min_bin_width * num_bins) * widths
    cumwidths = nn.functional.pad(torch.cumsum(widths, dim=-1), pad=(1, 0), value=0.0)
    cumwidths = _pin_ends((upper - lower) * cumwidths + lower, lower, upper)
    widths = cumwidths[..., 1:] - cumwidths[..., :-1]

    derivatives = min_derivative + nn.functional.softplus(padded)

    heights = nn.functional.softmax(unnormalized_heights, dim=-1)
    heights = min_bin_height + (1 - min_bin_height * num_bins) * heights
    cumheights = nn.functional.pad(torch.cumsum(heights, dim=-1), pad=(1, 0), value=0.0)
    cumheights = _pin_ends((upper - lower) * cumheights + lower, lower, upper)
    heights = cumheights[..., 1:] - cumheights[..., :-1]

    # The original nudges the last edge of the locations it searches (in place, so the
    # nudged edge is also the one it reads its cumulative value from).
    if reverse:
        cumheights = _pin_ends(cumheights, lower, upper + 1e-6)
        locations = cumheights
    else:
        cumwidths = _pin_ends(cumwidths, lower, upper + 1e-6)
        locations = cumwidths
    bin_idx = (torch.sum(x[..., None] >= locations, dim=-1) - 1)[..., None]

    input_cumwidths = cumwidths.gather(-1, bin_idx)[..., 0]
    input_bin_widths = widths.gather(-1, bin_idx)[..., 0]
    input_cumheights = cumheights.gather(-1, bin_idx)[..., 0]
    delta = heights / widths
    input_delta = delta.gather(-1, bin_idx)[..., 0]
    input_derivatives = derivatives.gather(-1, bin_idx)[..., 0]
    input_derivatives_plus_one = derivatives[..., 1:].gather(-1, bin_idx)[..., 0]
    input_heights = heights.gather(-1, bin_idx)[..., 0]

    intermediate1 = input_derivatives + input_derivatives_plus_one - 2 * input_delta
    if not reverse:
        theta = (x - input_cumwidths) / input_bin_widths
        theta_one_minus_theta = theta * (1 - theta)
        numerator = input_heights * (
            input_delta * theta.pow(2) + input_derivatives * theta_one_minus_theta
        )
        denominator = input_delta + intermediate1 * theta_one_minus_theta
        outputs = input_cumheights + numerator / denominator
        derivative_numerator = input_delta.pow(2) * (
            input_derivatives_plus_one * theta.pow(2)
            + 2 * input_delta * theta_one_minus_theta
            + input_derivatives * (1 - theta).pow(2)
        )
        log_abs_det = torch.log(derivative_numerator) - 2 * torch.log(denominator)
    else:
        intermediate2 = x - input_cumheights
        intermediate3 = intermediate2 * intermediate1
        a = input_heights * (input_delta - input_derivatives) + intermediate3
        b = input_heights * input_derivatives - intermediate3
        c = -input_delta * intermediate2
        discriminant = torch.clamp_min(b.pow(2) - 4 * a * c, 0.0)
        root = (2 * c) / (-b - torch.sqrt(discriminant))
        outputs = root * input_bin_widths + input_cumwidths
        theta_one_minus_theta = root * (1 - root)
        denominator = input_delta + intermediate1 * theta_one_minus_theta
        derivative_numerator = input_delta.pow(2) * (
            input_derivatives_plus_one * root.pow(2)
            + 2 * input_delta * theta_one_minus_theta
            + input_derivatives * (1 - root).pow(2)
        )
        log_abs_det = -(torch.log(derivative_numerator) - 2 * torch.log(denominator))
    return (
        torch.where(inside, outputs, inputs),
        torch.where(inside, log_abs_det, torch.zeros_like(log_abs_det)),
    )


def _pin_ends(edges: Any, first: float, last: float) -> Any:
    """`edges` with its first and last entries set exactly (the original assigns them in
    place after the affine map, which can round them off the bound)."""
    import torch

    return torch.cat(
        [
            torch.full_like(edges[..., :1], first),
            edges[..., 1:-1],
            torch.full_like(edges[..., -1:], last),
        ],
        dim=-1,
    )


def self_check(original: Any, seed: int = 0) -> float:
    """Runs `original` (transformers' function, eagerly) and `spline` on the same random
    inputs (a third of them outside the tail bound, at flow-like bin counts) in both
    directions; returns the largest difference, raising UnsupportedArchitecture when it
    is over CHECK_TOLERANCE."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for bins, tail in ((10, 5.0), (4, 2.0)):
        shape = (2, 3, 41)
        args = (
            (torch.rand(shape, generator=generator) - 0.5) * 3 * tail,
            torch.randn((*shape, bins), generator=generator),
            torch.randn((*shape, bins), generator=generator),
            torch.randn((*shape, bins - 1), generator=generator),
        )
        for reverse in (False, True):
            with torch.no_grad():
                want = original(*(a.clone() for a in args), reverse=reverse, tail_bound=tail)
                got = spline(*args, reverse=reverse, tail_bound=tail)
            for expected, actual in zip(want, got, strict=True):
                if not bool(torch.isfinite(actual).all()):
                    raise UnsupportedArchitecture(f"{TARGET} replacement is not finite")
                diff = float(((actual - expected).abs() / (1 + expected.abs())).max())
                worst = max(worst, diff)
    if worst > CHECK_TOLERANCE:
        raise UnsupportedArchitecture(
            f"this transformers release's {TARGET} no longer matches the export's "
            f"trace-friendly replacement (differs by {worst:.1e}); the exporter cannot "
            "convert the original"
        )
    return worst


@contextlib.contextmanager
def traceable_splines() -> Iterator[None]:
    """Within the block, transformers' VITS runs `spline` in place of its masked spline,
    after `self_check` has shown the two agree. A release without that function is left
    as it is."""
    import importlib

    module = importlib.import_module(MODULE)
    original = getattr(module, TARGET, None)
    if original is None:
        yield
        return
    self_check(original)
    setattr(module, TARGET, spline)
    try:
        yield
    finally:
        setattr(module, TARGET, original)
