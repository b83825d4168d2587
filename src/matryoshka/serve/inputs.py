"""The limits on request inputs (count, characters, tokens) and the checks that apply them: to
texts, and to token-id lists (the model tokenizer's ids, as OpenAI's API and TEI accept)."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from matryoshka.serve.config import ServeConfig
from matryoshka.serve.errors import ServeError

__all__ = ["TextLimits", "TokenCounter"]


class TokenCounter(Protocol):
    """What :meth:`TextLimits.check` needs of the encoder (see
    :meth:`~matryoshka.serve.encoder.ServedEncoder.count_and_cut`)."""

    def count_and_cut(
        self, texts: list[str], max_tokens: int, truncate: bool
    ) -> tuple[list[str], list[int]]:
        """Token counts (special tokens included); texts cut to ``max_tokens`` if ``truncate``."""
        ...


@dataclasses.dataclass(frozen=True)
class TextLimits:
    """How many texts a request may hold and how long each may be.

    Attributes:
        max_inputs: most texts in one request.
        max_chars: most characters per text.
        max_tokens: most tokens per text, special tokens included.
        truncate: cut longer texts to the limits instead of refusing them.
    """

    max_inputs: int
    max_chars: int
    max_tokens: int
    truncate: bool

    @classmethod
    def from_config(cls, config: ServeConfig, model_max_tokens: int) -> TextLimits:
        """The limits of ``config`` for a model that reads at most ``model_max_tokens`` tokens."""
        max_tokens = config.max_input_tokens or model_max_tokens
        if max_tokens > model_max_tokens:
            raise ValueError(
                f"max_input_tokens={max_tokens} exceeds the model's max_seq_length="
                f"{model_max_tokens}: the model would silently cut longer inputs; use at most "
                f"{model_max_tokens}."
            )
        return cls(
            config.max_inputs, config.max_input_chars, max_tokens, config.long_input == "truncate"
        )

    def check(
        self, texts: list[str], field: str, counter: TokenCounter
    ) -> tuple[list[str], list[int]]:
        """The texts to encode (cut if ``truncate``) and their token counts.

        Raises :class:`ServeError` naming ``field`` (``field[i]`` for one of several texts) for
        an empty list, too many texts, an empty text, or a text over a limit (unless cut).
        """
        if not texts:
            raise ServeError(
                f"'{field}' is an empty list: pass at least one non-empty string.",
                param=field,
                code="empty_input",
            )
        if len(texts) > self.max_inputs:
            raise ServeError(
                f"'{field}' has {len(texts)} texts but this server accepts at most "
                f"{self.max_inputs} per request: split them into several requests.",
                param=field,
                code="too_many_inputs",
            )
        out = [self._check_chars(t, _where(field, i, len(texts))) for i, t in enumerate(texts)]
        out, counts = counter.count_and_cut(out, self.max_tokens, self.truncate)
        for i, n in enumerate(counts):
            if n > self.max_tokens:
                raise ServeError(
                    f"'{_where(field, i, len(texts))}' has {n} tokens, more than the limit of "
                    f"{self.max_tokens}: shorten it or split it into several inputs.",
                    param=_where(field, i, len(texts)),
                    code="input_too_long",
                )
        return out, counts

    def check_ids(
        self, batch: list[list[int]], field: str, vocab_size: int
    ) -> tuple[list[list[int]], list[int]]:
        """The token-id lists to encode (cut to ``max_tokens`` if ``truncate``) and their lengths.

        ``batch`` holds ``n`` lists of the model tokenizer's ids, each taken as it is (special
        tokens are not added: send ``tokenizer(text)["input_ids"]`` to get the text's vector).
        Raises :class:`ServeError` naming ``field`` (``field[i]`` for one of several inputs) for
        an empty batch or list, too many inputs, a list over the token limit (unless cut), or an
        id outside ``[0, vocab_size)``.
        """
        if not batch:
            raise ServeError(
                f"'{field}' is an empty list: pass at least one non-empty list of token ids.",
                param=field,
                code="empty_input",
            )
        if len(batch) > self.max_inputs:
            raise ServeError(
                f"'{field}' has {len(batch)} token-id lists but this server accepts at most "
                f"{self.max_inputs} per request: split them into several requests.",
                param=field,
                code="too_many_inputs",
            )
        out: list[list[int]] = []
        for i, ids in enumerate(batch):
            where = _where(field, i, len(batch))
            if not ids:
                raise ServeError(
                    f"'{where}' is an empty list of token ids: every input needs at least one "
                    "token id.",
                    param=where,
                    code="empty_input",
                )
            if len(ids) > self.max_tokens:
                if not self.truncate:
                    raise ServeError(
                        f"'{where}' has {len(ids)} token ids, more than the limit of "
                        f"{self.max_tokens}: shorten it or split it into several inputs.",
                        param=where,
                        code="input_too_long",
                    )
                ids = ids[: self.max_tokens]
            for j, t in enumerate(ids):
                if not 0 <= t < vocab_size:
                    raise ServeError(
                        f"'{where}' holds the token id {t} at position {j}, outside the model's "
                        f"vocabulary [0, {vocab_size}): send ids from the model's tokenizer.",
                        param=where,
                        code="invalid_token_id",
                    )
            out.append(ids)
        return out, [len(ids) for ids in out]

    def _check_chars(self, text: str, where: str) -> str:
        """``text``, cut to ``max_chars`` when truncating; refused if empty or (else) too long."""
        if not text.strip():
            raise ServeError(
                f"'{where}' is an empty string: every input must contain text.",
                param=where,
                code="empty_input",
            )
        if len(text) <= self.max_chars:
            return text
        if not self.truncate:
            raise ServeError(
                f"'{where}' has {len(text)} characters, more than this server's limit of "
                f"{self.max_chars}: shorten it or split it into several inputs.",
                param=where,
                code="input_too_long",
            )
        return text[: self.max_chars]


def _where(field: str, i: int, n: int) -> str:
    """How to name text ``i`` of ``n`` in a message: ``field`` alone, or ``field[i]``."""
    return field if n == 1 else f"{field}[{i}]"
