"""export/vits_tracing.py: the trace-friendly spline computes what transformers' does, is
swapped in only for the block, and is what lets the ONNX exporter convert a spline flow."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import VitsConfig
from transformers.models.vits import modeling_vits

from nearvoice.export.errors import UnsupportedArchitecture
from nearvoice.export.vits_tracing import (
    CHECK_TOLERANCE,
    TARGET,
    self_check,
    spline,
    traceable_splines,
)

ORIGINAL = getattr(modeling_vits, TARGET)


def spline_args(seed: int, values: torch.Tensor, bins: int = 10) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shape = values.shape
    return (
        values,
        torch.randn((*shape, bins), generator=generator),
        torch.randn((*shape, bins), generator=generator),
        torch.randn((*shape, bins - 1), generator=generator),
    )


def test_the_installed_transformers_passes_the_self_check() -> None:
    for seed in range(3):
        assert self_check(ORIGINAL, seed) <= CHECK_TOLERANCE


@pytest.mark.parametrize("reverse", [False, True])
def test_the_bounds_and_beyond_match_the_original(reverse: bool) -> None:
    edges = torch.tensor([[[-7.0, -5.0, -4.9999, 0.0, 4.9999, 5.0, 5.0001, 12.0]]])
    args = spline_args(3, edges)
    want = ORIGINAL(*(a.clone() for a in args), reverse=reverse, tail_bound=5.0)
    got = spline(*args, reverse=reverse, tail_bound=5.0)
    for expected, actual in zip(want, got, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # outside the bound: the identity, with no change of volume
    assert got[0][0, 0, 0] == -7.0 and got[0][0, 0, -1] == 12.0
    assert got[1][0, 0, 0] == 0.0 and got[1][0, 0, -1] == 0.0


def test_reverse_inverts_forward() -> None:
    values = (torch.rand((1, 2, 50), generator=torch.Generator().manual_seed(4)) - 0.5) * 9
    args = spline_args(5, values)
    forward, log_det = spline(*args)
    back, back_log_det = spline(forward, *args[1:], reverse=True)
    torch.testing.assert_close(back, values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back_log_det, -log_det, atol=1e-4, rtol=1e-4)


def test_the_swap_lasts_for_the_block_only() -> None:
    with traceable_splines():
        assert getattr(modeling_vits, TARGET) is spline
    assert getattr(modeling_vits, TARGET) is ORIGINAL
    with pytest.raises(RuntimeError), traceable_splines():
        raise RuntimeError("export failed")
    assert getattr(modeling_vits, TARGET) is ORIGINAL


def test_a_changed_original_stops_the_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    def drifted(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, log_det = ORIGINAL(*args, **kwargs)
        return outputs * 1.01, log_det

    monkeypatch.setattr(modeling_vits, TARGET, drifted)
    with pytest.raises(UnsupportedArchitecture, match="no longer matches"), traceable_splines():
        pytest.fail("the block ran")
    assert getattr(modeling_vits, TARGET) is drifted


def test_a_release_without_the_spline_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(modeling_vits, TARGET)
    with traceable_splines():
        assert not hasattr(modeling_vits, TARGET)
    assert not hasattr(modeling_vits, TARGET)


def export_inverted_flow(flow: Any, path: Path) -> None:
    """One of the default duration predictor's spline flows, inverted as inference runs
    it, through the project's exporter (dynamo, opset 18)."""

    class Inverted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = flow

        def forward(self, latents: Any, mask: Any, condition: Any) -> Any:
            return self.flow(latents, mask, global_conditioning=condition, reverse=True)[0]

    frames = torch.export.Dim("frames", min=2, max=4096)
    example = (torch.randn(1, 2, 16), torch.ones(1, 1, 16), torch.randn(1, 192, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Inverted().eval(),
            example,
            str(path),
            input_names=["latents", "mask", "condition"],
            dynamic_shapes={"latents": {2: frames}, "mask": {2: frames}, "condition": {2: frames}},
            opset_version=18,
            dynamo=True,
            verbose=False,
        )


@pytest.mark.slow
def test_a_spline_flow_exports_only_with_the_swap(tmp_path: Path) -> None:
    torch.manual_seed(0)
    flow = modeling_vits.VitsConvFlow(VitsConfig()).eval()
    with pytest.raises(Exception, match="_is_all_true"):
        export_inverted_flow(flow, tmp_path / "original.onnx")
    with traceable_splines():
        export_inverted_flow(flow, tmp_path / "swapped.onnx")
    session = ort.InferenceSession(
        str(tmp_path / "swapped.onnx"), providers=["CPUExecutionProvider"]
    )
    for frames in (3, 40):
        generator = torch.Generator().manual_seed(frames)
        latents = torch.randn(1, 2, frames, generator=generator) * 4  # some beyond the bound
        mask = torch.ones(1, 1, frames)
        condition = torch.randn(1, 192, frames, generator=generator)
        with torch.no_grad():
            expected = flow(latents, mask, global_conditioning=condition, reverse=True)[0]
        feeds = {"latents": latents, "mask": mask, "condition": condition}
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
