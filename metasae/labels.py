"""Optional LLM labels from any OpenAI-compatible chat endpoint (off by default; offline labels are in stats.py).

The prompt shows the latent's top activating tokens, its boosted tokens and a few examples with the max token
in [[brackets]], and asks for a label of a few words.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPT = (
    "You label features of a language model. Given the tokens a feature fires on most, the tokens it pushes "
    "the model to predict, and example texts with the most activating token in [[brackets]], answer with a "
    "label of at most five words and nothing else.\n\nTop tokens: {top}\nBoosted tokens: {boosted}\n"
    "Examples:\n{examples}"
)


class LabelError(RuntimeError):
    """The endpoint refused or answered something that is not a label."""


def _example_text(tokens: Sequence[str], position: int) -> str:
    return "".join(f"[[{t}]]" if i == position else t for i, t in enumerate(tokens))


def build_prompt(top_tokens: Sequence[str], boosted: Sequence[str], examples: Sequence[dict]) -> str:
    ex = "\n".join(f"- {_example_text(e['tokens'], int(e['position']))}" for e in examples[:5])
    return PROMPT.format(top=", ".join(map(repr, top_tokens[:10])), boosted=", ".join(map(repr, boosted[:10])),
                         examples=ex or "(none)")


class LlmLabeller:
    """Client of an OpenAI-compatible `/chat/completions` endpoint (base URL like http://host:port/v1)."""

    def __init__(self, base_url: str, model: str = "gpt-4o-mini", api_key: str | None = None,
                 timeout: float = 30.0, max_workers: int = 4):
        self.url = base_url.rstrip("/") + "/chat/completions"
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.model, self.max_workers = model, max_workers

    def label(self, top_tokens: Sequence[str], boosted: Sequence[str], examples: Sequence[dict]) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": build_prompt(top_tokens, boosted, examples)}]}
        try:
            r = self.client.post(self.url, json=body)
        except httpx.HTTPError as e:
            raise LabelError(f"label endpoint {self.url} unreachable: {e}") from e
        if r.status_code != 200:
            raise LabelError(f"label endpoint {self.url} answered {r.status_code}: {r.text[:200]}")
        try:
            text = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise LabelError(f"label endpoint {self.url} answered no chat completion: {r.text[:200]}") from e
        label = " ".join(str(text).strip().strip('"').split())[:80]
        if not label:
            raise LabelError(f"label endpoint {self.url} answered an empty label")
        return label

    def label_many(self, items: Sequence[tuple[Sequence[str], Sequence[str], Sequence[dict]]]) -> list[str]:
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda it: self.label(*it), items))
