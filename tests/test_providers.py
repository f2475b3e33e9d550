"""edge/synth/providers.py: execution provider choice, export profiles, session options."""

from __future__ import annotations

from pathlib import Path

from nearvoice.edge.synth.piper_engine import BUNDLED
from nearvoice.edge.synth.providers import choose, primary, session, short_name, with_profile

TRT = "TensorrtExecutionProvider"
PROFILE = {"trt_profile_min_shapes": "input:1x1", "trt_profile_max_shapes": "input:1x1024"}


def test_cpu_is_always_last(tmp_path: Path) -> None:
    assert choose(("tensorrt", "cuda", "cpu"), tmp_path)[-1] == "CPUExecutionProvider"


def test_primary_is_the_first_installed_preference() -> None:
    assert primary(("tensorrt", "cuda", "cpu")) == "cpu"  # this machine has no GPU
    assert primary(()) == "cpu"


def test_profile_merges_into_the_tensorrt_entry() -> None:
    providers = [(TRT, {"trt_engine_cache_enable": True}), "CPUExecutionProvider"]
    merged = with_profile(providers, PROFILE)
    assert merged[0] == (TRT, {"trt_engine_cache_enable": True, **PROFILE})
    assert merged[1] == "CPUExecutionProvider"


def test_profile_leaves_other_providers_alone() -> None:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert with_profile(providers, PROFILE) == providers


def test_a_bare_tensorrt_name_gets_the_profile() -> None:
    assert with_profile([TRT], PROFILE) == [(TRT, PROFILE)]


def test_sessions_run_on_the_given_threads() -> None:
    loaded = session(BUNDLED["joe"].model_path(), 1, ["CPUExecutionProvider"])
    assert short_name(loaded.get_providers()[0]) == "cpu"
    assert loaded.get_session_options().intra_op_num_threads == 1
