"""english_text: page text extraction, the disjoint eval/calib split, the apt-get + dpkg-deb cache
(on a small .deb built here, and through fake apt-get programs), token windows, calibration batches.

The one test that downloads the real python3.11-doc package is marked slow."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lowbit.zoo.tiny_llama import ByteTokenizer

# The package re-exports the function `english_text`, which shadows the module of that name.
et = importlib.import_module("lowbit.zoo.english_text")

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")

PAGE = """<html><head><script>var x = "not text";</script><style>p {{}}</style></head><body>
<div class="related" role="navigation"><a href="index.html">Navigation</a></div>
<div class="document"><div class="bodywrapper"><div class="body" role="main">
<section><h1>{title}<a class="headerlink" href="#t" title="Permalink">&#182;</a></h1>
<p>The <code class="xref"><span class="pre">{word}</span></code> page &amp; its   text,
spread over lines.</p>
<div class="highlight"><pre><span></span><span class="k">def</span> f():
    return 1
</pre></div>
<ul><li><p>one item</p></li><li><p>another</p></li></ul>
<script>hidden()</script>
</section><div class="clearer"></div></div></div></div>
<div class="sphinxsidebar" role="navigation"><p>Sidebar text</p></div>
<div class="footer">Footer text</div></body></html>"""


def page(title: str, word: str) -> str:
    return PAGE.format(title=title, word=word)


def test_page_text_keeps_the_body_only():
    text = et.page_text(page("Title", "word"))
    assert text == ("Title\n\nThe word page & its text, spread over lines.\n\n"
                    "def f():\n    return 1\n\none item\n\nanother")
    for left_out in ("Navigation", "Sidebar", "Footer", "not text", "hidden", "\u00b6"):
        assert left_out not in text


def test_split_is_by_page_hash_and_about_a_fifth_is_eval():
    pages = [f"library/module{i}.html" for i in range(2000)]
    splits = [et.split_of(p) for p in pages]
    assert splits == [et.split_of(p) for p in pages]  # deterministic
    share = splits.count("eval") / len(pages)
    assert abs(share - et.EVAL_SHARE) < 0.03, share


def _pages_for_both_splits() -> dict[str, str]:
    """Page paths (two per split) -> a word only that page contains; plus pages that are skipped."""
    wanted, pages = {"eval": 2, "calib": 2}, {}
    for i in range(200):
        name = f"library/m{i}.html"
        if wanted[et.split_of(name)]:
            wanted[et.split_of(name)] -= 1
            pages[name] = f"word{i}"
    return pages


@pytest.fixture(scope="module")
def fake_deb(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny python3.11-doc_9.9-test_all.deb holding four pages and three index pages."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb (Debian/Ubuntu)")
    root = tmp_path_factory.mktemp("deb") / "pkg"
    pages = _pages_for_both_splits()
    html = root / et.HTML_ROOT
    for name, word in {**pages, "index.html": "INDEX", "genindex-A.html": "GENINDEX",
                       "library/index.html": "LIBINDEX"}.items():
        (html / name).parent.mkdir(parents=True, exist_ok=True)
        (html / name).write_text(page(name, word))
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(
        "Package: python3.11-doc\nVersion: 9.9-test\nArchitecture: all\nMaintainer: lowbit tests <t@example.org>\n"
        "Description: a few pages for tests\n")
    deb = root.parent / "python3.11-doc_9.9-test_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb, pages


def _check_cache(cache: Path, pages: dict[str, str]) -> None:
    manifest = json.loads((cache / "text" / "python3.11-doc_9.9-test" / "manifest.json").read_text())
    assert manifest["version"] == "9.9-test"
    for split in et.SPLITS:
        text = et.english_text(split, cache_dir=cache)
        mine = sorted((p for p in pages if et.split_of(p) == split), key=et._page_hash)
        assert manifest["pages"][split] == mine
        assert text == "\n\n".join(et.page_text(page(p, pages[p])) for p in mine)  # in hash order
        assert not any(pages[p] in text for p in pages if p not in mine)  # disjoint
        assert "INDEX" not in text and "Sidebar" not in text


@needs_dpkg
def test_from_a_deb_then_from_the_cache(fake_deb, tmp_path, monkeypatch):
    deb, pages = fake_deb
    assert et.english_text("eval", cache_dir=tmp_path, deb=deb)
    _check_cache(tmp_path, pages)

    def no_rebuild(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(et, "_build_cache", no_rebuild)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    assert et.english_text("calib") == et.english_text("calib", cache_dir=tmp_path)
    assert not list((tmp_path / "text").glob(".staging-*"))


def _fake_bin(tmp_path: Path, apt_get: str | None) -> str:
    """A PATH whose ``apt-get`` is a shell script with this body (before the real PATH), or, with
    None, a PATH with dpkg-deb and no apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if apt_get is None:
        (bin_dir / "dpkg-deb").symlink_to(shutil.which("dpkg-deb"))
        return str(bin_dir)
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\n{apt_get}\n")
    (bin_dir / "apt-get").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@needs_dpkg
def test_downloads_with_apt_get(fake_deb, tmp_path, monkeypatch):
    deb, pages = fake_deb
    # a stand-in apt-get: "apt-get download python3.11-doc" drops the .deb into the working folder
    path = _fake_bin(tmp_path, f'[ "$1 $2" = "download python3.11-doc" ] && cp "{deb}" . || exit 3')
    monkeypatch.setenv("PATH", path)
    et.english_text("eval", cache_dir=tmp_path / "cache")
    _check_cache(tmp_path / "cache", pages)


@needs_dpkg
def test_apt_get_failure_says_how_to_fix_it(tmp_path, monkeypatch):
    path = _fake_bin(tmp_path, 'echo "E: Unable to locate package $2" >&2; exit 100')
    monkeypatch.setenv("PATH", path)
    with pytest.raises(RuntimeError, match=r"(?s)Unable to locate package python3.11-doc.*apt-get update.*deb="):
        et.english_text("eval", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "text").iterdir())  # nothing half-written


@needs_dpkg
def test_missing_apt_get_names_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, None))
    with pytest.raises(FileNotFoundError, match="deb=PATH"):
        et.english_text("calib", cache_dir=tmp_path / "cache")


@needs_dpkg
def test_a_broken_deb_or_no_dpkg_deb_is_named(tmp_path, monkeypatch):
    broken = tmp_path / "python3.11-doc_1.0_all.deb"
    broken.write_bytes(b"not an archive")
    with pytest.raises(RuntimeError, match="dpkg-deb -x"):
        et.english_text("eval", cache_dir=tmp_path / "cache", deb=broken)
    assert not list((tmp_path / "cache" / "text").iterdir())
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="needs dpkg-deb"):
        et.english_text("eval", cache_dir=tmp_path / "cache", deb=broken)


def test_bad_split():
    with pytest.raises(ValueError, match="'eval', 'calib'|'calib', 'eval'"):
        et.english_text("train")


TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def test_token_windows_are_consecutive_and_drop_the_tail():
    tok = ByteTokenizer()
    ids = list(TEXT.encode())
    windows = et.token_windows(tok, TEXT, window=100)
    assert windows.dtype == torch.long and windows.shape == (len(ids) // 100, 100)
    assert windows.flatten().tolist() == ids[: windows.numel()]


def test_count_tokenizes_a_prefix_with_the_same_windows():
    calls = []

    def counting(text, add_special_tokens=False):
        calls.append(len(text))
        return ByteTokenizer()(text, add_special_tokens=add_special_tokens)

    full = et.token_windows(ByteTokenizer(), TEXT, window=50)
    few = et.token_windows(counting, TEXT, window=50, count=3)
    assert torch.equal(few, full[:3])
    assert max(calls) < len(TEXT)  # only a prefix was read
    more = et.token_windows(counting, TEXT, window=50, count=full.shape[0])  # the prefix grows to it all
    assert torch.equal(more, full)
    with pytest.raises(ValueError, match="fewer than count"):
        et.token_windows(ByteTokenizer(), TEXT, window=50, count=full.shape[0] + 1)
    with pytest.raises(ValueError, match="window must be"):
        et.token_windows(ByteTokenizer(), TEXT, window=1)


@needs_dpkg
def test_calibration_batches_come_from_the_calib_split(fake_deb, tmp_path, monkeypatch):
    deb, _ = fake_deb
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    et.english_text("calib", deb=deb)
    calib = list(et.english_text("calib").encode())
    batches = et.calibration_batches(ByteTokenizer(), n=3, seq=16)
    assert len(batches) == 3 and all(b["input_ids"].shape == (1, 16) for b in batches)
    assert torch.cat([b["input_ids"] for b in batches]).flatten().tolist() == calib[:48]
    tensors = et.calibration_batches(ByteTokenizer(), n=5, seq=16, batch_size=2, dicts=False)
    assert [tuple(t.shape) for t in tensors] == [(2, 16), (2, 16), (1, 16)]
    own = et.calibration_batches(ByteTokenizer(), n=1, seq=4, text="abcdefgh")
    assert own[0]["input_ids"].tolist() == [[97, 98, 99, 100]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_real_python_docs(tmp_path):
    """Downloads python3.11-doc (~13 MB) with apt-get: both splits are large, disjoint, prose."""
    texts = {s: et.english_text(s, cache_dir=tmp_path) for s in et.SPLITS}
    (folder,) = (tmp_path / "text").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    eval_pages, calib_pages = set(manifest["pages"]["eval"]), set(manifest["pages"]["calib"])
    assert not eval_pages & calib_pages and len(eval_pages) > 50 and len(calib_pages) > 200
    assert "tutorial/controlflow.html" in eval_pages | calib_pages
    assert not any(Path(p).name in ("index.html", "genindex.html", "search.html") for p in eval_pages | calib_pages)
    assert len(texts["eval"]) > 500_000 and len(texts["calib"]) > 2 * len(texts["eval"])
    for text in texts.values():
        assert text.count(" the ") > 1000
        assert "\u00b6" not in text and "Permalink to this" not in text and "Show Source" not in text
    assert os.environ.get("LOWBIT_CACHE") != str(tmp_path)  # the user's cache was not touched
