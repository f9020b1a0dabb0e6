"""Checks on referring expressions at the entry points (Predictor, `refseg predict`, the REST API),
and the reader of `refseg predict`'s query files (`read_queries`).

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

import codecs
import csv
import io
import json
from collections import OrderedDict
from pathlib import Path
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


def read_queries(path) -> "OrderedDict[str, List[str]]":
    """Read a batch job's query file into {image: [expressions]} (file order kept).

    CSV (any suffix but .jsonl / .json): a header with columns ``image`` and
    ``text``, one row per expression. JSONL: one object per line,
    ``{"image": "a.png", "text": "..."}`` or ``{"image": ..., "texts": [...]}``.

    The file is UTF-8; a leading byte-order mark (what spreadsheet programs
    write) is skipped. JSONL lines end at "\\n" only: U+2028 / U+2029 (and the
    other characters `str.splitlines` breaks at) are text inside a JSON string.
    Expressions are checked with `check_expressions`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming ``path:line`` and the field at fault.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: queries file not found")
    raw = path.read_bytes()
    body = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        content = body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{body[e.start]:02x})") from None
    queries: "OrderedDict[str, List[str]]" = OrderedDict()
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, line in enumerate(content.split("\n"), 1):
            if line.strip():
                image, texts = _jsonl_row(line, f"{path}:{lineno}")
                queries.setdefault(image, []).extend(texts)
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        try:
            missing = {"image", "text"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: CSV header lacks column(s) {sorted(missing)}; found {reader.fieldnames}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not (row["image"] or "").strip() or not (row["text"] or "").strip():
                    raise ValueError(f"{where}: empty 'image' or 'text'")
                _check_image_name(row["image"], where)
                check_expressions(row["text"], f"{where}: expression")
                queries.setdefault(row["image"], []).append(row["text"])
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if not queries:
        raise ValueError(f"{path}: no queries found")
    return queries


def _jsonl_row(line: str, where: str) -> tuple:
    """(image, [texts]) of one JSONL line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer literal of more than 4300 digits
        raise ValueError(f"{where}: not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(row, dict) or "image" not in row or not ("text" in row or "texts" in row):
        raise ValueError(f"{where}: needs an 'image' field and a 'text' or 'texts' field")
    texts = row.get("texts", [row.get("text")])
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{where}: field 'texts' must be a list of non-empty strings")
    if not isinstance(row["image"], str) or not row["image"].strip():
        raise ValueError(f"{where}: field 'image' must be a non-empty string, got {type(row['image']).__name__}")
    _check_image_name(row["image"], where)
    check_expressions(texts, f"{where}: expression")
    return row["image"], texts


def _check_image_name(name: str, where: str) -> None:
    if "\0" in name or any("\ud800" <= c <= "\udfff" for c in name):
        raise ValueError(f"{where}: field 'image' holds a NUL or a lone surrogate ({name!r:.80})")
