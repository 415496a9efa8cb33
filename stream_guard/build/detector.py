"""The image tower of the embedded default: NudeNet 320n wrapped for serving.

The shipped detector takes float NCHW in [0, 1] and emits YOLOv8 rows [B, 4 + 18, anchors]. We
wrap it so Triton receives what the worker sends cheaply, uint8 NHWC 320x320 RGB
(``stream_guard.media.decode.preprocess_for_detector``), and returns what the head needs: each
class's strongest confidence over all anchors, [B, 18]. No NMS: the head wants evidence
strength, not boxes. The wrapped graph is plain ONNX, so the GPU flavour serves the same file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stream_guard.policy.model import IMAGE_SIGNALS

__all__ = [
    "INPUT_SIZE",
    "default_nudenet_path",
    "wrap_detector",
]

INPUT_SIZE = 320


def default_nudenet_path() -> Path:
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the NudeNet weights are missing: pip install 'nudenet==3.4.2' (the `local` extra)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "320n.onnx"


def wrap_detector(src: Path, out: Path) -> Path:
    """Write the serving graph: IMAGE uint8 [B,320,320,3] -> SIGNALS float [B,18]."""
    inner = onnx.load(str(src))
    inner_in = inner.graph.input[0].name
    inner_out = inner.graph.output[0].name
    g = inner.graph
    n = helper.make_node
    pre = [
        n("Cast", ["IMAGE"], ["image_f"], to=TensorProto.FLOAT),
        n("Mul", ["image_f", "inv255"], ["image_unit"]),
        n("Transpose", ["image_unit"], [inner_in], perm=[0, 3, 1, 2]),
    ]
    n_cls = len(IMAGE_SIGNALS)
    post = [
        n("Slice", [inner_out, "cls_start", "cls_end", "cls_axis"], ["class_scores"]),
        n("ReduceMax", ["class_scores"], ["SIGNALS"], axes=[2], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), "inv255"),
        numpy_helper.from_array(np.array([4], np.int64), "cls_start"),
        numpy_helper.from_array(np.array([4 + n_cls], np.int64), "cls_end"),
        numpy_helper.from_array(np.array([1], np.int64), "cls_axis"),
    ]
    nodes = pre + list(g.node) + post
    graph = helper.make_graph(
        nodes,
        "image_detector",
        [helper.make_tensor_value_info("IMAGE", TensorProto.UINT8, ["batch", 320, 320, 3])],
        [helper.make_tensor_value_info("SIGNALS", TensorProto.FLOAT, ["batch", n_cls])],
        initializer=list(g.initializer) + inits,
        value_info=list(g.value_info),
    )
    model = helper.make_model(graph, opset_imports=inner.opset_import)
    model.ir_version = inner.ir_version
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out
