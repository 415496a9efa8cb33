"""Triton Python-backend OCR: RGB uint8 images -> the text read in each (PP-OCR via rapidocr).

One response per request; an image that fails gets its own TritonError and the rest of the batch
still answers. An image without text answers an empty string.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from rapidocr_onnxruntime import RapidOCR


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads", "1"))
        self.min_score = float(params.get("min_score", "0.5"))
        self.engine = RapidOCR(
            det_limit_type="max",
            det_limit_side_len=int(params.get("det_limit_side_len", "960")),
            text_score=self.min_score,
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
        )

    def _read(self, rgb):
        # rapidocr treats an ndarray as OpenCV BGR.
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        result, _ = self.engine(bgr)
        lines = [text for _, text, score in (result or []) if float(score) >= self.min_score]
        return "\n".join(lines)

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            try:
                texts = [self._read(image) for image in images]
            except Exception as e:  # one unreadable image must not fail the other requests
                # INVALID_ARGUMENT: this input cannot be read, retrying it cannot help (the
                # worker dead-letters the upload instead of waiting for Triton to "recover").
                error = pb_utils.TritonError(
                    f"ocr failed: {e}", pb_utils.TritonError.INVALID_ARGUMENT
                )
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            out = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TEXT", out)]))
        return responses
