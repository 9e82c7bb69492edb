"""Tokenization with the base's fast tokenizer: no padding here (batches pad to their own longest
row), explicit truncation policy (truncate=False turns an over-long text into INVALID_ARGUMENT)."""
from __future__ import annotations

import copy
import itertools
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from adapterserve.runtime.errors import InvalidInputError


class Encoded:
    """One text's token ids; token_type_ids only for a text with a pair (None: every type is 0, which
    collate fills in without reading a list per row)."""

    __slots__ = ("input_ids", "token_type_ids", "truncated", "length")

    def __init__(self, input_ids: list[int], token_type_ids: Optional[list[int]], truncated: bool) -> None:
        self.input_ids, self.token_type_ids, self.truncated = input_ids, token_type_ids, truncated
        self.length = len(input_ids)

    def __repr__(self) -> str:
        return f"Encoded({self.input_ids!r}, {self.token_type_ids!r}, {self.truncated!r})"


class TextEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, virtual_base: Optional[int] = None) -> None:
        """virtual_base: the first id past the word embedding's rows; a prompt task's n virtual tokens are
        ids virtual_base .. virtual_base + n - 1 before its own (runtime/engine/slot_prompts.py)."""
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.virtual_base = virtual_base
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names
        # The Rust tokenizer itself, as a private copy with truncation and padding off (the HF wrapper
        # sets both on its backend per call): the same ids as tokenizer(...) without the wrapper's
        # Python layers, which took longer than the tokenization of a short text (~23 us vs ~10 us
        # here, and several times that with cold caches right after a forward).
        self.backend = None
        if getattr(tokenizer, "is_fast", False):
            self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
            self.backend.no_truncation()
            self.backend.no_padding()

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
               truncate: bool = True, virtual: Optional[Sequence[int]] = None,
               prefix: Optional[Sequence[int]] = None) -> list[Encoded]:
        """virtual: per text, the virtual tokens its task puts first (prompt tuning); prefix: per text, the
        positions its task's prefix takes (prefix tuning: keys and values, no ids). Both count against
        max_length, and truncation leaves room for them."""
        if (virtual is not None and any(virtual)) or (prefix is not None and any(prefix)):
            return self._encode_with_virtual(texts, pairs, truncate, virtual or [0] * len(texts),
                                             prefix or [0] * len(texts))
        return self._encode(texts, pairs, truncate, self.max_length)

    def _encode_with_virtual(self, texts, pairs, truncate: bool, virtual: Sequence[int],
                             prefix: Sequence[int]) -> list[Encoded]:
        # One tokenizer call for every row whatever its task reserves: a call per reservation cost a
        # batch of mixed kinds 1.3 % (three calls per batch of 32 with prompt and prefix tasks in it).
        encoded = self._encode(texts, pairs, truncate, self.max_length, list(zip(virtual, prefix)))
        out = []
        for n, enc in zip(virtual, encoded):
            if n:
                ids = list(range(self.virtual_base, self.virtual_base + n))
                types = [0] * n + enc.token_type_ids if enc.token_type_ids is not None else None
                enc = Encoded(ids + enc.input_ids, types, enc.truncated)
            out.append(enc)
        return out

    def _encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]], truncate: bool,
                max_length: int, reserved: Optional[Sequence[tuple[int, int]]] = None) -> list[Encoded]:
        """reserved: per text, the (virtual tokens, prefix positions) its task takes, which leave it
        max_length minus their sum."""
        if pairs is not None and len(pairs) != len(texts):
            raise InvalidInputError(f"text_pairs has {len(pairs)} entries but texts has {len(texts)}; send none or one per text")
        # verbose=False: no "longer than max length" warning; lengths are checked right here.
        kwargs = dict(padding=False, return_attention_mask=False, return_token_type_ids=self.uses_token_types,
                      verbose=False)
        full = self._encode_full(texts, pairs, kwargs)
        limits = [max_length] * len(texts) if reserved is None else [max_length - n - p for n, p in reserved]
        too_long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > limits[i]]
        if too_long and not truncate:
            i = too_long[0]
            message = (f"text {i} is {len(full['input_ids'][i])} tokens long, above the model's maximum of {max_length}; "
                       "shorten it or set truncate=true")
            if limits[i] != max_length:
                n, p = reserved[i]
                what = f"puts {n} virtual tokens first" if n else f"has a prefix of {p} positions"
                message += f" (this task {what}, so a text may take {limits[i]} of the model's {max_length} positions)"
            raise InvalidInputError(message)
        typed = self.uses_token_types and pairs is not None  # a single text's types are all 0: Encoded says None
        out = [
            Encoded(ids, full["token_type_ids"][i] if typed else None, False)
            for i, ids in enumerate(full["input_ids"])
        ]
        for limit in sorted({limits[i] for i in too_long}):
            rows = [i for i in too_long if limits[i] == limit]
            cut = self.tokenizer(
                [texts[i] for i in rows], [pairs[i] for i in rows] if pairs is not None else None,
                truncation=True, max_length=limit, **kwargs,
            )
            for j, i in enumerate(rows):
                out[i] = Encoded(cut["input_ids"][j], cut["token_type_ids"][j] if typed else None, True)
        return out

    def _encode_full(self, texts: Sequence[str], pairs: Optional[Sequence[str]], kwargs: dict) -> dict:
        if self.backend is None:
            return self.tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=False, **kwargs)
        if len(texts) == 1:  # encode(), not encode_batch(): no hand-off to the Rust thread pool for one text
            encodings = [self.backend.encode(texts[0], pairs[0] if pairs is not None else None)]
        else:
            encodings = self.backend.encode_batch(list(zip(texts, pairs)) if pairs is not None else list(texts))
        out = {"input_ids": [e.ids for e in encodings]}
        if self.uses_token_types and pairs is not None:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        return out

    def collate(self, rows: Sequence[Encoded], device: torch.device,
                lengths: Optional[np.ndarray] = None, packed: bool = False) -> dict[str, torch.Tensor]:
        """Pad to the longest row of this batch (lengths: the rows' lengths, if the caller has them).
        Every row's ids go into one flat array and are scattered under the mask in numpy: nested
        Python lists took 2.67 ms per 256-row batch, this 0.45 ms (docs/benchmarks.md, GPU section).
        packed (CPU): the rows' tokens back to back instead, input_ids and token_type_ids [1, N] and
        row_offsets [B + 1], what a token-packed engine runs on (engine/packing.pack adds positions):
        no padded array is built only to be unpadded again."""
        if lengths is None:
            lengths = np.fromiter((r.length for r in rows), dtype=np.int64, count=len(rows))
        total = int(lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(r.input_ids for r in rows), dtype=np.int64, count=total)
        types = None  # None: every type is 0
        if self.uses_token_types and any(r.token_type_ids is not None for r in rows):
            types = np.fromiter(itertools.chain.from_iterable(
                r.token_type_ids if r.token_type_ids is not None else [0] * r.length for r in rows),
                dtype=np.int64, count=total)
        if packed:
            offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            return {"input_ids": torch.from_numpy(ids[None]),
                    "token_type_ids": torch.from_numpy((types if types is not None else np.zeros(total, np.int64))[None]),
                    "row_offsets": torch.from_numpy(offsets)}
        mask = np.arange(int(lengths.max())) < lengths[:, None]

        def to_device(array: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(array)
            # Pinned, so the copy to a GPU is asynchronous (ordered on the stream the forward then uses).
            return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor

        def padded(flat: np.ndarray, fill: int) -> torch.Tensor:
            out = np.full(mask.shape, fill, dtype=np.int64)
            out[mask] = flat
            return to_device(out)

        # The mask is the lengths: no walk over tokens.
        inputs = {"input_ids": padded(ids, self.pad_id), "attention_mask": to_device(mask.astype(np.int64))}
        if self.uses_token_types:
            inputs["token_type_ids"] = (padded(types, 0) if types is not None
                                        else to_device(np.zeros(mask.shape, dtype=np.int64)))
        return inputs
