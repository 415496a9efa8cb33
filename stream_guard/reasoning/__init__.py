"""Reasoning tier: a vision-language guard model decides the uploads the fast mode escalates.

``prompts`` builds the chat messages of each prompt format, ``parsers`` reads the model's answer
back into a ``ReasoningResult``, ``client`` talks to any OpenAI-compatible chat-completions server,
``cascade`` turns the fast verdict and the model's answer into the final ``Verdict``, and
``server`` starts the local llama.cpp default.
"""

from stream_guard.reasoning.cascade import final_verdict
from stream_guard.reasoning.client import ReasoningAnswer, ReasoningClient
from stream_guard.reasoning.parsers import ReasoningResult, json_schema_for
from stream_guard.reasoning.prompts import build_messages

__all__ = [
    "ReasoningAnswer",
    "ReasoningClient",
    "ReasoningResult",
    "build_messages",
    "final_verdict",
    "json_schema_for",
]
