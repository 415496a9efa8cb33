"""Reasoning tier: a vision-language guard model decides the uploads the fast mode escalates.

``prompts`` builds the chat messages of each prompt format, ``parsers`` reads the model's answer
back into a ``ReasoningResult``, ``client`` talks to any OpenAI-compatible chat-completions server,
``cascade`` turns the fast verdict and the model's answer into the final ``Verdict``, and
``server`` starts the local llama.cpp default.
"""

from .cascade import final_verdict
from .client import ReasoningAnswer, ReasoningClient
from .parsers import ReasoningResult, json_schema_for
from .prompts import build_messages

__all__ = [
    "ReasoningAnswer",
    "ReasoningClient",
    "ReasoningResult",
    "build_messages",
    "final_verdict",
    "json_schema_for",
]
