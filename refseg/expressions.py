"""Checks on referring expressions at the entry points (Predictor, `refseg predict`, the REST API).

What is refused, with the expression's position in the message:
- anything that is not a ``str`` (bytes, None, numbers);
- an empty or whitespace-only expression;
- text holding lone surrogates (U+D800..U+DFFF): what Python makes of bytes
  that are not UTF-8 on a command line (``surrogateescape``) or from a
  ``"\\udcff"`` escape in JSON; the tokenizer cannot encode them.

What is accepted as it is (documented graceful results): any length (the
model's tokenizer keeps its first ``max_length`` tokens, so a 10 000
character expression segments like its beginning), emoji and other
characters outside the vocabulary (they become the tokenizer's unknown
token), control characters.
"""

from typing import List, Sequence, Union


def check_expressions(text: Union[str, Sequence[str]], where: str = "expression") -> List[str]:
    """`text` (one str or a sequence of str) -> a non-empty list of str; ValueError naming the bad one."""
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (list, tuple)):
        texts = list(text)
    else:
        raise ValueError(f"{where}: expected a str or a list of str, got {type(text).__name__} {text!r:.80}")
    if not texts:
        raise ValueError(f"{where}: no expression given (an empty list)")
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{where} #{k}: expected a str, got {type(t).__name__} {t!r:.80}")
        if not t.strip():
            raise ValueError(f"{where} #{k}: the expression is empty or only whitespace ({t!r:.40})")
        bad = next((i for i, c in enumerate(t) if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:
            byte = ord(t[bad]) - 0xDC00 if "\udc80" <= t[bad] <= "\udcff" else None
            what = f"undecodable byte 0x{byte:02x}" if byte is not None else f"lone surrogate U+{ord(t[bad]):04X}"
            raise ValueError(f"{where} #{k}: not valid UTF-8 text ({what} at character {bad}); "
                             "was it read with the wrong encoding?")
    return texts
