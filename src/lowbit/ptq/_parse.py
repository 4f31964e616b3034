"""The forms a list of PTQ steps comes in: Step objects, short forms (``"smoothquant(alpha=0.8)"``,
the CLI's ``--algorithms``), ``Step.to_dict`` mappings (recipes), and quantize's keyword flags."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .steps import FoldBatchNorm, Step, check_order, steps_from_flags


def _split(text: str) -> list[str]:
    """``text`` cut at the commas outside parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _value(text: str) -> object:
    """A JSON value (``0.8``, ``true``, ``"x"``), Python's True / False / None, or a bare word."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    return text


def parse_step(text: str) -> Step:
    """One step from its short form: ``"cle"``, ``"smoothquant(alpha=0.8)"``,
    ``"cle(relu6_to_relu=true, iterations=20)"``, ``"bias_correction(reference=model)"``.

    Raises:
        ValueError: bad syntax, an unknown name or field, a bad value (named).
        TypeError: a value of the wrong type (named).
    """
    text = text.strip()
    name, paren, rest = text.partition("(")
    if paren and not rest.endswith(")"):
        raise ValueError(f"algorithm {text!r}: expected name(field=value, ...), missing the closing ')'")
    fields: dict[str, object] = {}
    for item in _split(rest[:-1]) if paren and rest[:-1].strip() else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"algorithm {text!r}: {item.strip()!r} is not field=value")
        fields[key.strip()] = _value(value)
    return Step.from_dict({"name": name.strip(), **fields}, short=True)


def parse_steps(algorithms: str | Step | Mapping | Sequence[str | Step | Mapping]) -> tuple[Step, ...]:
    """A list of steps from any of its forms: Step objects, short forms, ``to_dict`` mappings, or
    one comma-separated string (``"cle,smoothquant(alpha=0.8),bias_correction"``).

    Raises:
        ValueError: an item that does not parse: bad syntax, an unknown name or field (named).
        TypeError: an item that is none of these forms, or a value of the wrong type (named).
    """
    if isinstance(algorithms, str):
        items: Sequence = [s for s in _split(algorithms) if s.strip()] if algorithms.strip() else []
    elif isinstance(algorithms, (Step, Mapping)):
        items = [algorithms]
    else:
        items = list(algorithms)
    steps = []
    for item in items:
        if isinstance(item, Step):
            steps.append(item)
        elif isinstance(item, str):
            steps.append(parse_step(item))
        elif isinstance(item, Mapping):
            steps.append(Step.from_dict(item))
        else:
            raise TypeError(f"algorithms: {item!r} is not a Step, a name like 'cle' or a mapping with a 'name'")
    return tuple(steps)


def resolve_algorithms(algorithms, *, fold_bn: bool = True, equalize: bool = False, equalize_relu6: bool = False,
                       smoothquant: float | None = None, bias_correction: bool = False) -> tuple[Step, ...]:
    """The steps ``quantize`` runs: ``algorithms`` (any ``parse_steps`` form), with FoldBatchNorm
    first when ``fold_bn`` and the list does not place it; or, when ``algorithms`` is None, the
    steps of the flags.  Checked for order.

    Raises:
        ValueError: ``algorithms`` together with an algorithm flag, ``fold_bn=False`` with a
            FoldBatchNorm in the list, a list out of order, or one that does not parse.
        TypeError: an item or value of the wrong type.
    """
    if algorithms is None:
        return steps_from_flags(fold_bn=fold_bn, equalize=equalize, equalize_relu6=equalize_relu6,
                                smoothquant=smoothquant, bias_correction=bias_correction)
    flags = {"equalize": equalize, "equalize_relu6": equalize_relu6, "smoothquant": smoothquant is not None,
             "bias_correction": bias_correction}
    if any(flags.values()):
        raise ValueError(f"quantize: {[k for k, on in flags.items() if on]} given together with algorithms=; "
                         "put every algorithm in the list, e.g. [CLE(), SmoothQuant(alpha=0.8), BiasCorrection()]")
    steps = parse_steps(algorithms)
    listed = any(isinstance(s, FoldBatchNorm) for s in steps)
    if listed and not fold_bn:
        raise ValueError("quantize: fold_bn=False, but algorithms lists FoldBatchNorm; drop one of them")
    if fold_bn and not listed:
        steps = (FoldBatchNorm(), *steps)  # folding comes first unless the list places it
    check_order(steps)
    return steps


__all__ = ["parse_step", "parse_steps", "resolve_algorithms"]
