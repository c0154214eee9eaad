"""Fixtures of the benchmark tests, all built offline in temporary folders:

* fake unpacked source trees (the formats of the pinned packages, with made-up content) in a fake data cache;
* tiny random models saved as model directories: a BERT and a CLIP, each with a WordPiece tokenizer whose vocab
  is written here (no download).
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import zlib
from pathlib import Path

import numpy as np

from keeplora_bench.continual import readers as R
from keeplora_bench.continual.sources import MANIFEST

# ------------------------------------------------------------------------------------------------ fake sources
TOPIC_WORDS = {
    "computers": ["computer", "program", "bug", "code", "unix", "disk"],
    "politics": ["vote", "senator", "law", "party", "election", "president"],
    "science": ["atom", "theory", "physics", "experiment", "chemist", "energy"],
    "food": ["bread", "cheese", "cook", "dinner", "soup", "apple"],
}
LANG_WORDS = {
    "en": ["the", "house", "is", "and", "good", "water"],
    "de": ["das", "haus", "ist", "und", "gut", "wasser"],
    "es": ["la", "casa", "es", "y", "bueno", "agua"],
    "it": ["la", "casa", "bella", "e", "buono", "acqua"],
    "ru": ["дом", "это", "и", "хорошо", "вода", "мир"],
    "pl": ["dom", "jest", "i", "dobrze", "woda", "swiat"],
}
SENTIMENT_WORDS = {"pos": ["great", "love", "wonderful", "happy"], "neg": ["awful", "hate", "terrible", "sad"]}
NOVEL_WORDS = {
    "emma": ["emma", "highbury", "knightley"],
    "persuasion": ["anne", "wentworth", "navy"],
    "prideprejudice": ["elizabeth", "darcy", "bennet"],
}
FILLER = ["a", "one", "day", "very", "with", "of", "to", "in", "it", "was", "that", "her", "his"]


def _sentence(rng: random.Random, words: list[str], n: int = 8) -> str:
    return " ".join(rng.choice(words if i % 2 == 0 else FILLER) for i in range(n))


def _stamp(root: Path, name: str) -> Path:
    a = MANIFEST[name]
    folder = root / "sources" / a.key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".complete").write_text(f"{a.name} {a.version} fixture\n")
    return folder


def write_wordnet(cache: Path, per_class: int = 30, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder = _stamp(cache, "wordnet-base") / R.WORDNET_DIR
    folder.mkdir(parents=True)
    lex = {"animal": 5, "plant": 20, "food": 13, "body": 8, "artifact": 6, "person": 18, "location": 15, "state": 26}
    words = {
        "animal": ["fur", "tail", "wild"],
        "plant": ["leaf", "flower", "root"],
        "food": ["eat", "sweet", "dish"],
        "body": ["organ", "bone", "skin"],
        "artifact": ["tool", "made", "device"],
        "person": ["someone", "worker", "who"],
        "location": ["region", "city", "place"],
        "state": ["condition", "being", "quality"],
    }
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by  \n"]
    offset = 1000
    for name, num in lex.items():
        for i in range(per_class):
            gloss = _sentence(rng, words[name], 6) + f' {i}; "an example {name} sentence"'
            lines.append(f"{offset:08d} {num:02d} n 01 word{offset} 0 000 | {gloss}  \n")
            offset += 1
    (folder / "data.noun").write_text("".join(lines))


def write_fortunes(cache: Path, per_file: int = 30, seed: int = 0) -> None:
    rng = random.Random(seed)
    base = _stamp(cache, "fortunes") / R.FORTUNES_DIR
    base.mkdir(parents=True)
    for topic, words in TOPIC_WORDS.items():
        entries = [_sentence(rng, words, 10) + f" {i}" for i in range(per_file)]
        (base / topic).write_text("\n%\n".join(entries) + "\n%\n")
        (base / f"{topic}.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    # an English file that is no topic class (fortune_language's English class draws only from such files) with a
    # topic quote repeated in capitals, which that class must drop; its own generator leaves the other texts as they are
    en_rng = random.Random(seed + 1)
    entries = [_sentence(en_rng, LANG_WORDS["en"], 10) + f" {i}" for i in range(per_file)]
    repeated = (base / next(iter(TOPIC_WORDS))).read_text().split("\n%\n")[0]
    (base / "people").write_text("\n%\n".join(entries + [repeated.upper()]) + "\n%\n")
    for lang in ("de", "es", "it", "ru", "pl"):
        folder = _stamp(cache, f"fortunes-{lang}") / R.FORTUNES_DIR / lang
        folder.mkdir(parents=True)
        entries = [_sentence(rng, LANG_WORDS[lang], 10) + f" {i}" for i in range(per_file)]
        (folder / "sprueche").write_text("\n%\n".join(entries) + "\n")
        (folder / "sprueche.u8").write_text("")  # empty placeholder, as in fortunes-pl
        (folder / "sprueche.dat").write_bytes(b"\x00\x01")


def write_vader(cache: Path, per_class: int = 30, seed: int = 0) -> None:
    rng = random.Random(seed)
    version = MANIFEST["vaderSentiment"].version
    root = _stamp(cache, "vaderSentiment")
    tarball = root / R.VADER_TARBALL.format(version=version)
    tarball.parent.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for domain, stem in R.VADER_DOMAINS.items():
            rows = []
            for i in range(per_class):
                rows.append(f"{i}_p\t{rng.uniform(0.6, 3.5):.3f}\t{_sentence(rng, SENTIMENT_WORDS['pos'])} {domain}")
                rows.append(f"{i}_n\t{-rng.uniform(0.6, 3.5):.3f}\t{_sentence(rng, SENTIMENT_WORDS['neg'])} {domain}")
                rows.append(f"{i}_z\t0.1\tneutral filler &amp; nothing {i}")  # |rating| < 0.5: dropped
            data = ("\r\n".join(rows) + "\r\n").encode()
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tarball.write_bytes(buf.getvalue())


def write_r_lazyload(folder: Path, variables: dict[str, list[str]], stem: str = "Rdata") -> None:
    """A real R lazy-load database (``.rdx`` index + zlib ``.rdb`` blobs) of character vectors, via rdata."""
    from rdata.conversion import convert_python_to_r_data
    from rdata.unparser import unparse_data

    folder.mkdir(parents=True, exist_ok=True)
    blobs, index = b"", {}
    for name, lines in variables.items():
        payload = unparse_data(convert_python_to_r_data(np.array(lines, dtype=object)))
        blob = len(payload).to_bytes(4, "big") + zlib.compress(payload)
        index[name] = np.array([len(blobs), len(blob)], dtype=np.int32)
        blobs += blob
    rdx = unparse_data(convert_python_to_r_data({"variables": index, "references": {}, "compressed": np.array([True])}))
    (folder / f"{stem}.rdb").write_bytes(blobs)
    (folder / f"{stem}.rdx").write_bytes(gzip.compress(rdx))


def write_austen(cache: Path, paragraphs: int = 30, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder = _stamp(cache, "r-cran-janeaustenr") / R.JANEAUSTENR_DATA
    novels = {}
    for key, words in NOVEL_WORDS.items():
        lines = [key.upper(), "", "CHAPTER 1", ""]
        for i in range(paragraphs):
            text = _sentence(rng, words, 16) + f" {i}"
            lines += [text[: len(text) // 2], text[len(text) // 2 :], ""]
        novels[key] = lines
    write_r_lazyload(folder, novels)


def write_all_sources(cache: Path) -> Path:
    write_wordnet(cache)
    write_fortunes(cache)
    write_vader(cache)
    write_austen(cache)
    return cache


# ------------------------------------------------------------------------------------------------ tiny models
def _vocab() -> list[str]:
    words = set(FILLER) | {w for ws in TOPIC_WORDS.values() for w in ws} | {w for ws in LANG_WORDS.values() for w in ws}
    words |= {w for ws in SENTIMENT_WORDS.values() for w in ws} | {w for ws in NOVEL_WORDS.values() for w in ws}
    words |= {
        "quote",
        "about",
        "this",
        "review",
        "is",
        "positive",
        "negative",
        "definition",
        "passage",
        "from",
        "german",
        "english",
        "spanish",
        "italian",
        "russian",
        "polish",
        "tweet",
        "movie",
        "product",
        "newspaper",
        "editorial",
        "an",
        "part",
        "the",
        "body",
        "man",
        "made",
        "object",
        "kind",
        "person",
        "place",
        "or",
        "drink",
        "condition",
        "plant",
        "animal",
        "food",
        "state",
        "computers",
        "politics",
        "science",
        "law",
        "work",
        "art",
        "star",
        "trek",
    }
    letters = "abcdefghijklmnopqrstuvwxyzабвгдежзийклмнопрстуфхцчшщъыьэюя0123456789"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + sorted(set(letters) | words | {"##" + c for c in letters} | set(".,;!?'&-"))


def _save_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(folder))  # builds the fast tokenizer from vocab.txt offline
    tok.save_pretrained(folder)
    return tok


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    tok = _save_tokenizer(folder)
    torch.manual_seed(seed)
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    )
    model.save_pretrained(folder)
    return folder


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok = _save_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            image_size=16,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def tiny_config(model_dir: Path, cache: Path, methods: list[dict], tasks: list[dict] | None = None, **extra) -> dict:
    """A run config (as a dict for YAML) over the fixture sources and a tiny model."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "model": {"path": str(model_dir), "kind": "auto", "max_length": 24, "logit_scale": 20.0},
        "data": {"train_per_class": 8, "test_per_class": 6, "cache": str(cache)},
        "tasks": tasks
        or [
            {"name": "topic", "builder": "fortune_topic"},
            {"name": "sentiment", "builder": "vader_sentiment", "domain": "tweets"},
            {"name": "novel", "builder": "austen_novel"},
        ],
        "training": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "threads": 1},
        "adapter": {"r": 4, "alpha": 4.0},
        "keeplora": {"weight_energy": 0.5, "feature_energy": 0.9},
        "methods": methods,
    }
    cfg.update(extra)
    return cfg


# ------------------------------------------------------------------------------------------------ a bench world
def make_bench_world(root: Path) -> Path:
    """``root`` with a fake data cache (``cache/``) and a tiny BERT model folder (``bert/``)."""
    write_all_sources(root / "cache")
    make_tiny_bert(root / "bert")
    return root


def write_config(cfg: dict, path: Path) -> Path:
    """``cfg`` as a YAML config file at ``path`` (keys in their order)."""
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
