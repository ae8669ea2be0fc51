"""Splitting a finished completion into per-block pieces, and SSE framing.

Contract: the model generates `C = block_size × patch_size` tokens per block (block 0 of a
prompt that ends mid-block produces `C − trim` new tokens, `pipeline.layout.plan_prompt`).
Workers return whole completions, so `BlockSplitter.split(text, prompt_tokens)` re-tokenizes
the finished text with the model's tokenizer and cuts it at those block boundaries; the pieces
always concatenate to `text` exactly (when re-tokenizing does not round-trip, or the tokenizer
cannot be read, the text is one piece). `sse(obj)` frames one server-sent event.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from tokenizers import Tokenizer

from cola_batch import keys, storage
from cola_batch.pipeline.layout import plan_prompt

log = logging.getLogger(__name__)


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class BlockSplitter:
    """Loads the tokenizer and block geometry of a model root lazily (once)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._loaded = False
        self._tokenizer: Tokenizer | None = None
        self._block_size, self._patch_size = 1, 1

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            try:
                dit = json.loads(storage.read_text(keys.join(self.model, "cola_dit/config.json")))
                vae = json.loads(storage.read_text(keys.join(self.model, "cola_vae/config.json")))
                self._block_size = int(dit["block_size"])
                self._patch_size = int(vae.get("patch_size", 1))
                text = storage.read_text(keys.join(self.model, "tokenizer.json"))
                self._tokenizer = Tokenizer.from_str(text)
            except Exception as exc:  # noqa: BLE001 - streaming still works, in one piece
                log.warning("streaming falls back to one chunk: cannot read the model (%s)", exc)
                self._tokenizer = None

    def split(self, text: str, prompt_tokens: int | None) -> list[str]:
        self._load()
        if not text or self._tokenizer is None:
            return [text]
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        c = self._block_size * self._patch_size
        first = c
        if prompt_tokens:
            trim = plan_prompt(prompt_tokens, self._block_size, self._patch_size).trim
            first = c - trim if trim else c
        bounds = list(range(first, len(ids), c)) if first < len(ids) else []
        pieces: list[str] = []
        done = ""
        for end in bounds:
            prefix = self._tokenizer.decode(ids[:end], skip_special_tokens=False)
            if not prefix.startswith(done) or not text.startswith(prefix):
                return [text]
            if len(prefix) > len(done):
                pieces.append(prefix[len(done) :])
                done = prefix
        if not text.startswith(done):
            return [text]
        pieces.append(text[len(done) :])
        return [p for p in pieces if p] or [text]
