"""edge/synth/providers.py: execution provider choice, export profiles, session options."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

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


def matmuls(size: int = 384, depth: int = 24) -> bytes:
    """A chain of `depth` square MatMuls: operators large enough for a pool to split."""
    weight = onnx.numpy_helper.from_array(np.eye(size, dtype=np.float32) * 0.5, "w")
    names = ["x", *(f"y{i}" for i in range(depth))]
    nodes = [helper.make_node("MatMul", [a, "w"], [b]) for a, b in itertools.pairwise(names)]
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [size, size])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def cpu_after_a_run(loaded: Any) -> float:
    """Seconds of CPU the process spent in the 0.1 s after a run of `loaded` (the least
    of three runs), its own thread sleeping."""
    feeds = {"x": np.ones((384, 384), dtype=np.float32)}
    spent = []
    for _ in range(3):
        loaded.run(None, feeds)
        start = time.process_time()
        time.sleep(0.1)  # the span measured, not a wait for anything
        spent.append(time.process_time() - start)
    return min(spent)


def test_a_sessions_threads_stop_spinning_when_its_run_returns() -> None:
    """onnxruntime's pool threads spin on after a run by default, waiting for the next
    one; the sessions made here give their cores back at once, spinning or not."""
    model, cpu = matmuls(), ["CPUExecutionProvider"]
    assert cpu_after_a_run(session(model, 2, cpu)) < 0.01
    assert cpu_after_a_run(session(model, 2, cpu, spin=False)) < 0.01
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    default = ort.InferenceSession(model, options, providers=cpu)
    assert cpu_after_a_run(default) > 0.02  # what the sessions here do not do
