"""Real English sentences without any download: taken from standard-library docstrings.

A fixed list of pure-Python stdlib modules is walked (the module docstring, then its
classes, functions and methods defined in that module); each docstring paragraph is
split into sentences, and a sentence is kept when it reads like prose: 6 to 40 words,
starts with a capital letter, ends with a full stop, mostly letters, and carries no
code (``>>>``, ``()``, ``=``, backquotes, underscores).  The pool is deduplicated and
sorted, then a seeded shuffle picks ``n``.

The pool depends on the Python version (docstrings change between releases), so the
same seed gives the same sentences on the same interpreter, not across versions.
Under ``python -OO`` docstrings are stripped and ``english_sentences`` raises.

Example::

    from lowbit.zoo import english_sentences
    texts = english_sentences(n=300, seed=0)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import random
import re
import sys
import warnings

log = logging.getLogger(__name__)

# Pure-Python modules with long prose docstrings; none opens a window or a socket on import.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.tasks", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures._base",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest",
    "email.message", "email.utils", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar",
    "http.server", "imaplib", "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "locale",
    "logging", "logging.handlers", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "queue", "quopri", "random", "reprlib", "sched", "selectors", "shelve",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "wave", "xml.dom.minidom", "zipfile",
)

MIN_WORDS, MAX_WORDS = 6, 40
_MIN_ALPHA = 0.9  # share of letters among the non-space characters (punctuation, digits are the rest)
_CODE = re.compile(r">>>|\(\)|[=_`{}\[\]<>|\\#@$*~^]|\.\.\.|::|://")
# A sentence ends at . ! or ? followed by space and a capital letter; "e.g. " / "i.e. " do not end one.
_SPLIT = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(module) -> list[str]:
    """The docstring of ``module`` and of every class, function and method it defines."""
    docs = [module.__doc__ or ""]
    for _, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ != module.__name__:
            continue  # skip re-exports, so a docstring is counted once, under its home module
        docs.append(obj.__doc__ or "")
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    docs.append(member.__doc__ or "")
    return docs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return False
    if not (sentence[0].isupper() and sentence.endswith(".")) or _CODE.search(sentence):
        return False
    chars = sentence.replace(" ", "")
    return sum(c.isalpha() for c in chars) >= _MIN_ALPHA * len(chars)


def _sentences(doc: str) -> list[str]:
    """Prose sentences of one docstring; paragraphs (blank-line separated) never merge."""
    out = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        # Indented lines are examples, tables or argument lists, not prose.
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        out += [s for s in _SPLIT.split(text) if _is_prose(s)]
    return out


def module_sentences(name: str) -> set[str]:
    """The prose sentences of the docstrings of standard-library module ``name`` (and of what it
    defines); empty when the module is not importable on this Python version."""
    # Touching deprecated names (typing.io, typing.re) warns; the docstrings are still fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module dropped from this Python version: the pool just shrinks
            log.debug("stdlib module %s not importable here; skipped", name)
            return set()
        docs = _docstrings(module)
    found: set[str] = set()
    for doc in docs:
        if isinstance(doc, str):  # a class may shadow __doc__ with a slot descriptor
            found.update(_sentences(doc))
    return found


@functools.lru_cache(maxsize=1)
def sentence_pool() -> tuple[str, ...]:
    """Every prose sentence found in ``STDLIB_MODULES``, deduplicated and sorted.

    Returns:
        A tuple of sentences (a few thousand on CPython 3.11).
    """
    found: set[str] = set().union(*(module_sentences(name) for name in STDLIB_MODULES))
    log.info("found %d stdlib docstring sentences on Python %s", len(found), sys.version.split()[0])
    return tuple(sorted(found))


def english_sentences(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences from standard-library docstrings, in seeded order.

    Args:
        n: how many sentences.
        seed: seed of the shuffle that picks them; the same seed gives the same list
            (on the same Python version).

    Returns:
        A list of ``n`` distinct sentences, each 6..40 words.

    Raises:
        ValueError: ``n`` exceeds the pool (or docstrings were stripped by ``-OO``).

    Example::

        english_sentences(3, seed=1)   # three sentences like "Return the number of ..."
    """
    pool = list(sentence_pool())
    if n < 0 or n > len(pool):
        stripped = sys.flags.optimize >= 2
        hint = " (docstrings are stripped under python -OO; run without it)" if stripped else ""
        raise ValueError(f"n must be in 0..{len(pool)} (the sentences available), got {n}{hint}")
    random.Random(seed).shuffle(pool)
    return pool[:n]
