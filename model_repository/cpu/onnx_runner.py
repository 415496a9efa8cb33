"""Triton Python-backend model that runs an ONNX file with onnxruntime (CPU flavour).

The GPU flavour serves the same file with `platform: "onnxruntime_onnx"` or a TensorRT plan;
this runner exists because the pip-installed tritonserver has the Python backend only. Tensor
names and dtypes come from config.pbtxt (never hard-coded), and every request of a dynamic
batch runs in ONE onnxruntime call, then the rows are split back per request.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        opts.inter_op_num_threads = 1
        # Busy-waiting intra-op threads steal the CPU the other models and the workers need
        # (measured: bare ceiling 49.6 -> 64.0 uploads/s on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            os.path.join(version_dir, params.get("onnx_file", "model.onnx")),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        # Rows per onnxruntime call (0: the whole dynamic batch). Triton merges queued requests
        # up to max_batch_size once they have waited past max_queue_delay, which under a
        # backlog is always; a model cheaper per row at a smaller batch sets this instead.
        self.run_batch = int(params.get("run_batch", "0"))
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [
            (o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]
        ]

    def execute(self, requests):
        arrays = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            for name in self.inputs:
                arrays[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(arrays[self.inputs[0]][-1].shape[0])
        feeds = {name: np.concatenate(parts) for name, parts in arrays.items()}
        try:
            results = self._run(feeds, sum(sizes))
        except Exception as e:  # one bad batch must not kill the model: fail each request
            error = pb_utils.TritonError(f"onnxruntime failed: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, result[start : start + size].astype(dtype))
                for (name, dtype), result in zip(self.outputs, results)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _run(self, feeds, rows):
        names = [n for n, _ in self.outputs]
        step = self.run_batch or rows
        if step >= rows:
            return self.session.run(names, feeds)
        parts = [
            self.session.run(names, {k: v[i : i + step] for k, v in feeds.items()})
            for i in range(0, rows, step)
        ]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]
