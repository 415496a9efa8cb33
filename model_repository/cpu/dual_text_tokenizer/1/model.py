"""Triton Python-backend tokenizer of an exported CLIP / SigLIP text tower: UTF-8 strings ->
int64 INPUT_IDS / ATTENTION_MASK, with the padding the model was trained with.

Step 1 of the ``<prefix>_text_embedder`` ensemble (``stream-guard model export``) in both
flavours: string work stays on the CPU. Parameters (written from the export's export.json):
``max_length`` (the text tower's context), ``padding`` (``longest``: the whole dynamic batch
padded to its longest text, CLIP; ``max_length``: every text padded to ``max_length``, SigLIP,
whose pooled token is the last position), ``pad_id``, and ``attention`` (``mask``: the real
attention mask; ``ones``: attend to every position, as SigLIP's processor does by passing none).
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
        max_length = int(params.get("max_length", "64"))
        pad_id = int(params.get("pad_id", "0"))
        pad_token = self.tokenizer.id_to_token(pad_id) or "[PAD]"
        self.tokenizer.enable_truncation(max_length)
        if params.get("padding", "longest") == "max_length":
            self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
        else:
            self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self.attend_all = params.get("attention", "mask") == "ones"

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
        if self.attend_all:
            mask = np.ones_like(mask)
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
