"""Held-out technical English for LLM work: calibration text and evaluation text, disjoint.

Both splits come from Debian's ``python3.11-doc`` package, the HTML build of the Python 3.11
documentation.  Every page's main body is turned into plain text (navigation, sidebars, the
"¶" permalinks and script/style removed; code examples kept, as they are part of the docs);
the index-like pages (``genindex*``, ``index.html``, ``search``, ``py-modindex``, ``contents``)
and the legal ones (``license``, ``copyright``) are left out.  A page belongs to the "eval"
split when the first byte of the SHA-256 of its path (``library/os.html``) is below
``EVAL_SHARE * 256``, otherwise to "calib": the split is held out by document (no page, hence
no passage, is in both), the same page always lands on the same side, and both sides mix every
part of the docs (tutorial, library, reference, C API, HOWTOs, what's new).  Within a split the
pages are ordered by that hash too, so the first windows of a split are already such a mix.

Why not ``bible-kjv-text`` for calibration, as the issue suggests: that package stores the text
in the ``bible`` program's own compressed format (``/usr/lib/bible.data``), readable only through
that program; and calibrating on the same kind of text one evaluates on is the usual protocol
(WikiText-2's train and test splits, say), so other pages of the same docs are the natural
calibration set.  Peers measured in the same benchmark get the same calibration text.

The package is fetched once with ``apt-get download`` (no root needed for that; the package
lists must be current, which ``apt-get update`` as root does), unpacked with ``dpkg-deb -x``,
and the two texts are written under the cache folder (``$LOWBIT_CACHE``, default
``~/.cache/lowbit``) in ``text/<package>_<version>/``; later calls read them from there.

Example::

    from lowbit.zoo import smollm2, english_text, token_windows, calibration_batches
    model, tokenizer = smollm2()
    windows = token_windows(tokenizer, english_text("eval"), window=512, count=40)   # (40, 512)
    calib = calibration_batches(tokenizer, n=128, seq=512)   # [{"input_ids": (1, 512)}, ...]
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DOC_PACKAGE = "python3.11-doc"
HTML_ROOT = "usr/share/doc/python3.11/html"  # where the package puts its pages
SPLITS = ("calib", "eval")
EVAL_SHARE = 0.2  # share of the pages (by path hash) held out for evaluation
# Pages that are lists of links or legal text rather than documentation prose.
_SKIPPED_PAGES = re.compile(r"(^|/)(index|genindex.*|search|py-modindex|contents|license|copyright)\.html$")
_BLOCK_TAGS = frozenset({"p", "div", "section", "pre", "li", "dt", "dd", "tr", "table", "blockquote", "br",
                         "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "figure", "caption"})
_SKIPPED_TAGS = frozenset({"script", "style"})


def cache_root() -> Path:
    """Where lowbit keeps what it derives from packages: ``$LOWBIT_CACHE``, else ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


class _BodyText(html.parser.HTMLParser):
    """Plain text of a Sphinx page's ``<div class="body" role="main">`` (the rest is navigation)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._body_depth = 0  # <div>s open since the body div (itself included); 0 = outside the body
        self._skip: tuple[str, int] | None = None  # (tag, nesting) of an element whose text is dropped
        self._pre = 0  # open <pre> elements: whitespace is kept inside them

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if not self._body_depth:
            self._body_depth = int(tag == "div" and attrs.get("role") == "main")
            return
        self._body_depth += tag == "div"
        if self._skip is not None:
            self._skip = (self._skip[0], self._skip[1] + (tag == self._skip[0]))
        elif tag in _SKIPPED_TAGS or "headerlink" in (attrs.get("class") or "").split():
            self._skip = (tag, 1)
        if tag == "pre":
            self._pre += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if not self._body_depth:
            return
        if self._skip is not None and tag == self._skip[0]:
            self._skip = (tag, self._skip[1] - 1) if self._skip[1] > 1 else None
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        self._body_depth -= tag == "div"

    def handle_data(self, data):
        if not self._body_depth or self._skip is not None:
            return
        if not self._pre:  # running text: one space for any run of whitespace, none at a line start
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip()
        self.parts.append(data)


def page_text(page_html: str) -> str:
    """The readable text of one Sphinx HTML page: its main body, one paragraph per block, blank
    lines between blocks, code blocks with their line breaks."""
    parser = _BodyText()
    parser.feed(page_html)
    parser.close()
    lines = (line.rstrip() for line in "".join(parser.parts).split("\n"))
    text = "\n".join(line if line.strip() else "" for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_of(page: str) -> str:
    """``"eval"`` or ``"calib"`` for a page path relative to the HTML root (``"library/os.html"``)."""
    return "eval" if _page_hash(page)[0] < EVAL_SHARE * 256 else "calib"


def _page_hash(page: str) -> bytes:
    return hashlib.sha256(page.encode()).digest()


def _split_texts(html_root: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Both splits' texts (pages joined by blank lines, in hash order) and their page lists."""
    pages = sorted((p.relative_to(html_root).as_posix() for p in html_root.rglob("*.html")), key=_page_hash)
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    for page in pages:
        if _SKIPPED_PAGES.search(page):
            continue
        text = page_text((html_root / page).read_text(encoding="utf-8", errors="replace"))
        if text:
            texts[split_of(page)].append(text)
            names[split_of(page)].append(page)
    return {s: "\n\n".join(t) for s, t in texts.items()}, names


def _download(package: str, folder: Path) -> Path:
    """``apt-get download package`` into ``folder``; the .deb's path."""
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(
            f"english_text needs apt-get to fetch the Debian package {package!r} (a Debian/Ubuntu machine); "
            f"elsewhere, download {package}_*.deb yourself and pass it as deb=PATH")
    done = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True,
                          check=False)
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise RuntimeError(
            f"`apt-get download {package}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}\n"
            f"If apt cannot locate the package, refresh the package lists with `apt-get update` (as root) "
            f"and retry, or download {package}_*.deb yourself and pass it as deb=PATH")
    return debs[0]


def _dpkg_deb(*args: str) -> str:
    """Run ``dpkg-deb *args``; its stdout, or a RuntimeError quoting its complaint."""
    done = subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`dpkg-deb {' '.join(args)}` failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def _build_cache(deb: Path | None, cache: Path) -> Path:
    """Fetch (unless ``deb`` is given), unpack and split the docs; the folder holding the texts."""
    if shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(f"english_text needs dpkg-deb to unpack the Debian package {DOC_PACKAGE!r} "
                                "(a Debian/Ubuntu machine: apt-get install dpkg)")
    with tempfile.TemporaryDirectory(prefix="lowbit-text-") as tmp:
        tmp = Path(tmp)
        deb = Path(deb) if deb is not None else _download(DOC_PACKAGE, tmp)
        # dpkg-deb -x: unpack the files only (no maintainer scripts, no root, nothing installed).
        _dpkg_deb("-x", str(deb), str(tmp / "root"))
        version = _dpkg_deb("-f", str(deb), "Version")
        html_root = tmp / "root" / HTML_ROOT
        if not html_root.is_dir():
            raise FileNotFoundError(f"{deb.name} has no {HTML_ROOT}/: not the {DOC_PACKAGE} package?")
        texts, names = _split_texts(html_root)
    if not all(texts.values()):
        raise ValueError(f"{deb.name}: a split is empty ({ {s: len(n) for s, n in names.items()} } pages)")
    out = cache / "text" / f"{DOC_PACKAGE}_{version}"
    manifest = {"package": DOC_PACKAGE, "version": version, "eval_share": EVAL_SHARE, "pages": names}
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache / "text"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any download
        for split in SPLITS:
            (staging / f"{split}.txt").write_text(texts[split], encoding="utf-8")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        staging.rename(out)  # atomic: a reader sees all of it or none
    except OSError:
        if not (out / "manifest.json").is_file():
            raise
        # another process renamed its copy into place first: use that one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("english_text: %s %s split into %s under %s", DOC_PACKAGE, version,
             {s: len(n) for s, n in names.items()}, out)
    return out


def _cached(cache: Path) -> Path | None:
    """The newest complete cached text folder of the package, or None."""
    found = sorted(p for p in (cache / "text").glob(f"{DOC_PACKAGE}_*") if (p / "manifest.json").is_file())
    return found[-1] if found else None


def english_text(split: str, *, cache_dir: str | os.PathLike | None = None,
                 deb: str | os.PathLike | None = None) -> str:
    """The evaluation or calibration text (see the module docstring for where it comes from).

    Args:
        split: ``"eval"`` or ``"calib"``; the two share no page.
        cache_dir: cache folder (default ``cache_root()``: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``).
        deb: a ``python3.11-doc_*.deb`` to use instead of ``apt-get download`` (offline machines);
            only read when the cache has no text yet.

    Returns:
        The split's pages as plain text, joined by blank lines (millions of characters).

    Raises:
        FileNotFoundError: no cached text and no apt-get (pass ``deb=``).
        RuntimeError: ``apt-get download`` failed (the message says how to fix it).
    """
    if split not in SPLITS:
        raise ValueError(f"english_text: split must be one of {SPLITS}, got {split!r}")
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = _cached(cache)
    if folder is None:
        (cache / "text").mkdir(parents=True, exist_ok=True)
        folder = _build_cache(deb, cache)
    return (folder / f"{split}.txt").read_text(encoding="utf-8")


_PREFIX_MARGIN = 256  # tokens tokenized past the last one used: a cut can only change tokens near it


def token_windows(tokenizer, text: str, window: int = 512, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``window`` tokens from ``text``, in order.

    The text is tokenized without special tokens (no BOS per window, as in the usual WikiText
    perplexity protocol) and cut into consecutive windows; the ragged tail is dropped.  With
    ``count``, only a prefix of the text that holds enough tokens is tokenized (cut at a line
    break, with ``_PREFIX_MARGIN`` tokens to spare, so the windows equal those of the whole text).

    Args:
        tokenizer: a Hugging Face tokenizer, or any callable ``tokenizer(text,
            add_special_tokens=False)`` returning a mapping with ``"input_ids"``.
        text: the text (e.g. ``english_text("eval")``).
        window: tokens per window.
        count: keep only the first ``count`` windows (None: all); more than the text holds is an error.

    Returns:
        LongTensor ``(n, window)``.
    """
    if window < 2:
        raise ValueError(f"token_windows: window must be at least 2 tokens, got {window}")
    if count is not None and count < 1:
        raise ValueError(f"token_windows: count must be positive or None, got {count}")
    needed = None if count is None else count * window + _PREFIX_MARGIN
    ids = _tokenize_prefix(tokenizer, text, needed)
    n = ids.numel() // window
    if count is not None:
        if count > n:
            raise ValueError(f"token_windows: the text holds {n} windows of {window} tokens "
                             f"({ids.numel()} tokens), fewer than count={count}; lower count or window")
        n = count
    return ids[: n * window].view(n, window)


def _tokenize_prefix(tokenizer, text: str, needed: int | None) -> torch.Tensor:
    """Token ids of ``text``, or of a prefix ending at a line break that yields ``needed`` tokens
    or more (the whole text when it has fewer); a 1-D LongTensor."""
    end = len(text) if needed is None else min(len(text), 4 * needed)  # ~4 characters per token
    while True:
        cut = text.find("\n", end)
        prefix = text if cut < 0 else text[:cut]
        ids = torch.as_tensor(tokenizer(prefix, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if needed is None or ids.numel() >= needed or len(prefix) == len(text):
            return ids.flatten()
        end = 2 * end + 1


def calibration_batches(tokenizer, n: int = 128, seq: int = 512, *, text: str | None = None,
                        batch_size: int = 1, dicts: bool = True) -> list:
    """Calibration inputs for LLM algorithms: the first ``n`` windows of ``seq`` tokens of the
    calibration text (``english_text("calib")`` unless ``text`` is given).

    Args:
        tokenizer: as for ``token_windows``.
        n: number of sequences.
        seq: tokens per sequence.
        text: text to cut them from (default: the calibration split, never the evaluation one).
        batch_size: sequences per batch (the last batch may be smaller).
        dicts: batches as ``{"input_ids": LongTensor(b, seq)}`` (keyword inputs of a Hugging Face
            model); False gives the LongTensors themselves.

    Returns:
        A list of ``ceil(n / batch_size)`` batches, e.g. for ``lowbit.quantize(model, batches, ...)``.
    """
    if batch_size < 1:
        raise ValueError(f"calibration_batches: batch_size must be positive, got {batch_size}")
    windows = token_windows(tokenizer, english_text("calib") if text is None else text, window=seq, count=n)
    batches = list(windows.split(batch_size))
    return [{"input_ids": b} for b in batches] if dicts else batches
