"""A labelled text task without a download: which part of the standard library a sentence is from.

The sentences are those of ``lowbit.zoo.sentences`` (prose sentences of standard-library
docstrings), kept with the module they came from.  Modules are grouped into six topics
(e-mail, web, concurrency, files, debugging and testing, logging); a sentence's label is
its module's topic.  A sentence found under two topics is dropped, so no text carries two
labels.  The task is real but not trivial: many docstring sentences ("Return the number of
bytes written.") could sit in more than one topic.

Example::

    from lowbit.zoo.docstring_topics import topic_sentences, TOPICS
    texts, labels = topic_sentences(per_topic=100, seed=0)   # 600 sentences, balanced
    list(TOPICS)[labels[0]]                                    # e.g. "concurrency"
"""

from __future__ import annotations

import functools
import random
from types import MappingProxyType

from .sentences import module_sentences

TOPICS = MappingProxyType({
    "email": ("email.message", "email.utils", "mailbox", "smtplib", "imaplib", "poplib"),
    "web": ("http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse", "socket",
            "socketserver", "ftplib"),
    "concurrency": ("threading", "asyncio.events", "asyncio.tasks", "asyncio.locks", "asyncio.streams",
                    "asyncio.queues", "concurrent.futures._base", "queue", "subprocess", "sched",
                    "multiprocessing.pool", "selectors"),
    "files": ("pathlib", "tarfile", "tempfile", "shutil", "zipfile", "os", "gzip", "filecmp", "glob",
              "shelve"),
    "debugging": ("unittest.case", "unittest.mock", "doctest", "pdb", "traceback", "inspect", "dis",
                  "trace", "profile", "pstats", "timeit"),
    "logging": ("logging", "logging.handlers"),
})
"""Topic name -> the standard-library modules whose docstrings it takes."""


@functools.lru_cache(maxsize=1)
def topic_pool() -> tuple[tuple[str, ...], ...]:
    """Per topic (in ``TOPICS`` order), its sentences, deduplicated and sorted; sentences that
    occur under two topics are removed from both."""
    found = [set().union(*(module_sentences(name) for name in modules)) for modules in TOPICS.values()]
    shared = {s for i, a in enumerate(found) for b in found[i + 1:] for s in a & b}
    return tuple(tuple(sorted(s - shared)) for s in found)


def topic_sentences(per_topic: int = 100, seed: int = 0) -> tuple[list[str], list[int]]:
    """``per_topic`` sentences of every topic (a seeded draw), shuffled together.

    Args:
        per_topic: sentences per topic.
        seed: seed of the draw and of the order; a larger ``per_topic`` with the same seed
            extends the draw of each topic (the first ``per_topic`` stay the same).

    Returns:
        ``(texts, labels)``: ``6 * per_topic`` sentences and their topic indices (``list(TOPICS)``).

    Raises:
        ValueError: a topic has fewer than ``per_topic`` sentences on this Python version.
    """
    pools = topic_pool()
    smallest = min(len(p) for p in pools)
    if not 0 <= per_topic <= smallest:
        raise ValueError(f"per_topic must be in 0..{smallest} (the smallest topic here), got {per_topic}")
    rng = random.Random(seed)
    pairs = []
    for label, pool in enumerate(pools):
        pool = list(pool)
        rng.shuffle(pool)
        pairs += [(s, label) for s in pool[:per_topic]]
    rng.shuffle(pairs)
    return [s for s, _ in pairs], [label for _, label in pairs]
