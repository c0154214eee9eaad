"""Parsers of the raw source formats (pure functions of files on disk; no downloads here).

* WordNet ``data.noun`` / ``data.verb``: one synset per line; field 2 is the lexicographer-file number (the
  supersense), the gloss follows ``" | "``.
* fortune files: entries separated by lines holding only ``%``; ``.dat`` files are binary indexes and ``.u8``
  files are symlinks or empty placeholders, both skipped. Text is UTF-8 in every file of the pinned packages
  (checked); a file that is not is decoded with the language's legacy code page and reported.
* VADER ground truth (inside ``additional_resources/hutto_ICWSM_2014.tar.gz`` of the sdist): tab-separated
  ``id, mean rating (-4..4), text``, CRLF line ends, HTML entities in the tweets.
* janeaustenr: an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs); each novel is a character
  vector of text lines, paragraphs separated by empty lines. Read with the ``rdata`` package.
"""

from __future__ import annotations

import html
import io
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

# WordNet lexicographer files (lexnames(5WN)): number -> name
WORDNET_LEXNAMES = {
    0: "adj.all",
    1: "adj.pert",
    2: "adv.all",
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
    29: "verb.body",
    30: "verb.change",
    31: "verb.cognition",
    32: "verb.communication",
    33: "verb.competition",
    34: "verb.consumption",
    35: "verb.contact",
    36: "verb.creation",
    37: "verb.emotion",
    38: "verb.motion",
    39: "verb.perception",
    40: "verb.possession",
    41: "verb.social",
    42: "verb.stative",
    43: "verb.weather",
    44: "adj.ppl",
}

WORDNET_DIR = "usr/share/wordnet"
FORTUNES_DIR = "usr/share/games/fortunes"
JANEAUSTENR_DATA = "usr/lib/R/site-library/janeaustenr/data"
VADER_TARBALL = "vaderSentiment-{version}/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_DOMAINS = {
    "tweets": "tweets",
    "movies": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}
LEGACY_ENCODINGS = {"ru": "koi8-r", "pl": "iso-8859-2"}  # fallback only; every pinned file is UTF-8

_WS = re.compile(r"\s+")


def normalize_space(text: str) -> str:
    return _WS.sub(" ", text).strip()


# ---------------------------------------------------------------- WordNet
def read_wordnet_synsets(root: Path, pos: str = "noun") -> Iterator[tuple[str, list[str], str, str]]:
    """Yield ``(offset, lemmas, definition, lexname)`` for every synset of ``data.<pos>`` (lemmas with spaces for
    underscores and without the adjective markers).

    The gloss is ``definition; "example"; ...``: only the definition is kept (the examples often quote the very
    word, which is not what a task asks about).
    """
    path = Path(root) / WORDNET_DIR / f"data.{pos}"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                continue
            fields = head.split(" ")
            lexname = WORDNET_LEXNAMES[int(fields[1])]
            count = int(fields[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if definition:
                yield fields[0], lemmas, definition, lexname


def read_wordnet(root: Path, pos: str = "noun") -> Iterator[tuple[str, str]]:
    """Yield ``(definition, lexname)`` for every synset of ``data.<pos>`` (see :func:`read_wordnet_synsets`)."""
    for _, _, definition, lexname in read_wordnet_synsets(root, pos):
        yield definition, lexname


# ---------------------------------------------------------------- fortunes
_OVERSTRIKE = re.compile(r".\x08")


def decode_text(raw: bytes, lang: str = "en") -> tuple[str, str]:
    """Decode bytes as UTF-8, else with the language's legacy code page; returns ``(text, encoding)``."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        enc = LEGACY_ENCODINGS.get(lang, "latin-1")
        return raw.decode(enc), enc


def split_fortunes(text: str) -> list[str]:
    """Entries of one fortune file: split on lines that hold only ``%``, overstrike removed, whitespace collapsed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _OVERSTRIKE.sub("", text)
    entries, current = [], []
    for line in text.split("\n"):
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e for e in (normalize_space(x) for x in entries) if e]


def fortune_files(folder: Path) -> list[Path]:
    """The fortune text files directly in ``folder``: regular files, not indexes (``.dat``), not ``.u8`` twins."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and p.name != "off"
    )


def read_fortune_file(path: Path, lang: str = "en") -> tuple[list[str], str]:
    text, enc = decode_text(Path(path).read_bytes(), lang)
    return split_fortunes(text), enc


def is_prose(text: str, min_words: int = 4) -> bool:
    """Filter out ASCII art and fragments: at least ``min_words`` words, at least 60% letters among non-spaces."""
    if len(text.split()) < min_words:
        return False
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters >= 0.6 * len(visible)


# ---------------------------------------------------------------- VADER
def read_vader(sdist_root: Path, version: str = "3.3.2") -> dict[str, list[tuple[str, float]]]:
    """``{domain: [(text, mean rating), ...]}`` for the four VADER ground-truth corpora."""
    tarball = Path(sdist_root) / VADER_TARBALL.format(version=version)
    out: dict[str, list[tuple[str, float]]] = {}
    with tarfile.open(tarball) as tf:
        members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
        for domain, stem in VADER_DOMAINS.items():
            member = members[f"{stem}_GroundTruth.txt"]
            raw = tf.extractfile(member).read()
            out[domain] = list(parse_vader_ground_truth(raw))
    return out


def parse_vader_ground_truth(raw: bytes) -> Iterator[tuple[str, float]]:
    text, _ = decode_text(raw)
    for line in io.StringIO(text.replace("\r\n", "\n")):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        sentence = normalize_space(html.unescape("\t".join(parts[2:])))
        if sentence:
            yield sentence, rating


# ---------------------------------------------------------------- Jane Austen (R lazy-load database)
AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def read_r_lazyload(data_dir: Path, stem: str = "Rdata") -> dict[str, object]:
    """All variables of an R lazy-load database ``<stem>.rdx``/``<stem>.rdb`` as Python objects (via ``rdata``).

    The ``.rdx`` is a gzip-compressed serialized R list ``{variables: {name: (offset, length)}, compressed}``; each
    blob in the ``.rdb`` is a 4-byte big-endian uncompressed length followed by the compressed serialization
    (zlib for ``compressed = TRUE``/1; for 2/3 a type byte ``'Z'``/``'2'``/``'X'``/``'0'`` precedes the payload).
    """
    import bz2
    import lzma
    import warnings

    import rdata

    data_dir = Path(data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the .rdx extension is not .rds
        index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / f"{stem}.rdx"))
    compressed = int(index["compressed"][0])
    blob_file = (data_dir / f"{stem}.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = blob_file[int(offset) : int(offset) + int(length)]
        payload = blob[4:]
        if compressed in (2, 3):
            kind, payload = payload[:1], payload[1:]
            codec = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind]
        else:
            codec = zlib.decompress
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(codec(payload)))
    return out


def austen_paragraphs(lines, min_words: int = 12) -> list[str]:
    """Paragraphs (runs of non-empty lines) of one novel, without headings and paragraphs under ``min_words``."""
    paragraphs, current = [], []
    for line in list(lines) + [""]:
        line = "" if line is None else str(line)
        if line.strip():
            current.append(line.strip())
            continue
        if current:
            para = normalize_space(" ".join(current))
            current = []
            if len(para.split()) >= min_words and not re.match(r"^(chapter|volume)\b", para, re.IGNORECASE):
                paragraphs.append(para)
    return paragraphs


def read_austen(root: Path) -> dict[str, list[str]]:
    """``{novel key: [paragraph, ...]}`` from the unpacked ``r-cran-janeaustenr`` package."""
    variables = read_r_lazyload(Path(root) / JANEAUSTENR_DATA)
    return {key: austen_paragraphs(variables[key]) for key in AUSTEN_NOVELS if key in variables}
