"""Triton Python-backend tokenizer: UTF-8 strings -> int64 input_ids / attention_mask.

Step 1 of the GPU flavour's text_encoder ensemble. Pads the whole dynamic batch to its longest
text (one length per response batch), so the ONNX encoder step batches the rows again.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.tokenizer = Tokenizer.from_file(os.path.join(version_dir, "tokenizer.json"))
        self.tokenizer.enable_truncation(int(params.get("max_length", "128")))
        self.tokenizer.enable_padding()

    def execute(self, requests):
        texts, sizes = [], []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts.extend(
                t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)
                for t in raw
            )
            sizes.append(len(raw))
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        responses, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("INPUT_IDS", ids[rows]),
                        pb_utils.Tensor("ATTENTION_MASK", mask[rows]),
                    ]
                )
            )
            start += size
        return responses
