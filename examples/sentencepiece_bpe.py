"""SentencePiece's BPE encoding over a vocabulary with scores (as a GGUF file stores it).

No ``sentencepiece`` or ``tokenizers`` dependency: the vocabulary, scores and piece types are
all the algorithm needs, and transformers' conversion of Gemma 3's GGUF tokenizer is wrong.
"""

from __future__ import annotations

import heapq

import numpy as np

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece's piece types


class Tokenizer:
    """SentencePiece BPE over a GGUF vocabulary: spaces become ``▁``; user-defined pieces are
    matched first (longest first); each remaining run of text starts as characters and the
    adjacent pair whose joined piece has the highest score is merged until none is in the
    vocabulary (ties: leftmost); characters outside it fall back to ``<0xXX>`` byte pieces."""

    def __init__(self, pieces, scores, types, meta: dict | None = None):
        meta = meta or {}
        self.pieces = [str(p) for p in pieces]
        self.scores = np.asarray(scores, np.float32)
        self.types = np.asarray(types, np.int32)
        self.ids = {p: i for i, p in enumerate(self.pieces) if self.types[i] in (NORMAL, USER_DEFINED, BYTE)}
        self.user = sorted((p for i, p in enumerate(self.pieces) if self.types[i] == USER_DEFINED), key=len)[::-1]
        self.user_first = {}
        for p in self.user:
            self.user_first.setdefault(p[0], []).append(p)
        self.bytes = {int(p[3:5], 16): i for i, p in enumerate(self.pieces) if self.types[i] == BYTE}
        self.bos = int(meta.get("bos_token_id", 2))
        self.eos = int(meta.get("eos_token_id", 1))
        self.pad = int(meta.get("padding_token_id", 0))
        self.unk = int(meta.get("unknown_token_id", 3))
        self.add_bos = bool(meta.get("add_bos_token", True))
        self.space_prefix = bool(meta.get("add_space_prefix", False))

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        text = ("▁" if self.space_prefix and text else "") + text.replace(" ", "▁")
        out = [self.bos] if (self.add_bos if bos is None else bos) else []
        start = i = 0
        while i < len(text):
            match = next((p for p in self.user_first.get(text[i], ()) if text.startswith(p, i)), None)
            if match is None:
                i += 1
                continue
            out += self._bpe(text[start:i]) + [self.ids[match]]
            i = start = i + len(match)
        return out + self._bpe(text[start:])

    def _bpe(self, text: str) -> list[int]:
        if not text:
            return []
        symbols = list(text)
        nxt, prv = list(range(1, len(symbols) + 1)), list(range(-1, len(symbols) - 1))
        alive = [True] * len(symbols)
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right < len(symbols):
                joined = symbols[left] + symbols[right]
                piece = self.ids.get(joined)
                if piece is not None and self.types[piece] == NORMAL:
                    heapq.heappush(heap, (-float(self.scores[piece]), left, right, joined))

        for k in range(len(symbols) - 1):
            push(k)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            if not (alive[left] and alive[right] and nxt[left] == right and symbols[left] + symbols[right] == joined):
                continue  # stale: one side was merged since
            symbols[left], alive[right] = joined, False
            nxt[left] = nxt[right]
            if nxt[right] < len(symbols):
                prv[nxt[right]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        return [i for k, symbol in enumerate(symbols) if alive[k] for i in self._ids_of(symbol)]

    def _ids_of(self, symbol: str) -> list[int]:
        """A merged symbol's piece, or its bytes' pieces (byte fallback)."""
        piece = self.ids.get(symbol)
        return [piece] if piece is not None else [self.bytes.get(b, self.unk) for b in symbol.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytearray()
        for i in ids:
            i = int(i)
            if self.types[i] == BYTE:
                data.append(int(self.pieces[i][3:5], 16))
            elif self.types[i] in (NORMAL, USER_DEFINED):
                data += self.pieces[i].replace("▁", " ").encode("utf-8")
        return data.decode("utf-8", errors="replace")
