"""Task builders: raw sources -> balanced, deterministic train/validation/test splits with natural-language prompts.

A task is a classification problem with its own label set (task identity is given by the label set, as in MTIL).
Each builder turns the unpacked sources into a pool ``{class key: [text, ...]}`` plus one prompt per class; the
split is drawn from the pool by :func:`balanced_split`, deterministically from the seed:

* texts that occur under two classes of the builder's pool, up to case and whitespace, are dropped whether or not
  the task takes both classes (so tasks that take different classes of one builder never share a text), and
  duplicates within a class are merged;
* per class the (sorted) texts are shuffled by a generator seeded from ``(seed, task, class)``; the first
  ``test_per_class`` go to test, the next ``val_per_class`` to validation, the next ``train_per_class`` to train —
  so a smaller training budget (e.g. ``--quick``) draws a subset of the same test set's complement, the test set
  of a given size never depends on the validation or training size, and without a validation split
  (``val_per_class = 0``) train and test are those of a benchmark that has none;
* validation and training draws pass over any text that repeats a test (or, for training, a validation) text of
  the task, in any class, up to case and whitespace (:func:`normalise`), so a task never trains on a variant of
  what it is scored on.

No text of a test or validation split may occur in the training split of any task of a run (the same task or
another), compared exactly and case/whitespace-normalised: :func:`check_no_overlap` enforces it, and the builders
keep tasks that share raw files apart (see :func:`build_fortune_language`).

Processed splits are cached as JSONL under ``<cache>/processed/<task>-<key>/`` (the key hashes everything the
split depends on), so later runs need neither the registries nor the raw sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keeplora import durable

from . import readers as R
from .sources import MANIFEST, cache_dir, source_root

BUILDER_VERSION = 2  # bump when a builder's output changes: it invalidates the processed cache


@dataclass
class Task:
    """One task of the sequence: ``train``/``test``/``val`` are lists of ``(text, label index)`` (``val`` may be
    empty; a probe task that is only evaluated has an empty ``train``)."""

    name: str
    classes: list[str]
    prompts: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    meta: dict = field(default_factory=dict)
    val: list[tuple[str, int]] = field(default_factory=list)

    def fingerprint(self) -> str:
        # the validation split joins the payload only when there is one: fingerprints of tasks without one are
        # those recorded before validation splits existed
        payload = [self.name, self.classes, self.prompts, self.train, self.test] + ([self.val] if self.val else [])
        h = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode())
        return h.hexdigest()[:16]


@dataclass
class Pool:
    """What a builder returns: texts per class key, the default prompt and display name per class key."""

    texts: dict[str, list[str]]
    prompts: dict[str, str]
    sources: list[str]
    default_classes: list[str] | None = None  # None: every key of ``texts``
    notes: dict = field(default_factory=dict)  # e.g. files that were not UTF-8


Builder = Callable[..., Pool]
BUILDERS: dict[str, Builder] = {}


def builder(name: str):
    def register(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------- builders
WORDNET_NOUN_PROMPTS = {
    "animal": "A definition of an animal.",
    "plant": "A definition of a plant.",
    "food": "A definition of a food or a drink.",
    "body": "A definition of a part of the body.",
    "artifact": "A definition of a man-made object.",
    "person": "A definition of a kind of person.",
    "location": "A definition of a place.",
    "state": "A definition of a state or condition.",
    "act": "A definition of an act or action.",
    "feeling": "A definition of a feeling or emotion.",
    "time": "A definition of a period or point in time.",
    "substance": "A definition of a substance or material.",
}

WORDNET_NOUN_DEFAULT = ["animal", "plant", "food", "body", "artifact", "person", "location", "state"]

WORDNET_VERB_PROMPTS = {
    "motion": "A definition of a verb of motion.",
    "communication": "A definition of a verb of speaking or communicating.",
    "consumption": "A definition of a verb of eating or drinking.",
    "emotion": "A definition of a verb of feeling.",
    "weather": "A definition of a verb about the weather.",
    "creation": "A definition of a verb of making or creating.",
    "competition": "A definition of a verb of fighting or competing.",
    "perception": "A definition of a verb of seeing, hearing or sensing.",
}


@builder("wordnet_supersense")
def build_wordnet(cache: Path | None = None, pos: str = "noun") -> Pool:
    """WordNet 3.0 glosses labelled by their lexicographer file (supersense), nouns or verbs."""
    if pos not in ("noun", "verb"):
        raise ValueError(f"wordnet_supersense: pos must be 'noun' or 'verb', got {pos!r}")
    prompts = WORDNET_NOUN_PROMPTS if pos == "noun" else WORDNET_VERB_PROMPTS
    texts: dict[str, list[str]] = {k: [] for k in prompts}
    for definition, lexname in R.read_wordnet(source_root("wordnet-base", cache), pos):
        key = lexname.split(".", 1)[1]
        if key in texts:
            texts[key].append(definition)
    default = WORDNET_NOUN_DEFAULT if pos == "noun" else list(WORDNET_VERB_PROMPTS)
    return Pool(texts, dict(prompts), ["wordnet-base"], default)


@builder("wordnet_gloss")
def build_wordnet_gloss(cache: Path | None = None, pos: str = "verb", synsets: int = 500) -> Pool:
    """Lemma → definition retrieval as a ``synsets``-way task: each class is a WordNet synset, its prompt the
    synset's definition, its one text the synset's first lemma; accuracy is recall@1 of the lemma among all the
    definitions. Only synsets whose first lemma names no other synset of ``pos`` and whose definition is unique
    qualify (the answer is then unambiguous); ``synsets`` of them are taken evenly spaced in file order, so the set
    depends on the WordNet release only. Use it with ``test_per_class: 1`` and no training or validation split.
    """
    if pos not in ("noun", "verb"):
        raise ValueError(f"wordnet_gloss: pos must be 'noun' or 'verb', got {pos!r}")
    entries = list(R.read_wordnet_synsets(source_root("wordnet-base", cache), pos))
    lemma_count: dict[str, int] = {}
    definition_count: dict[str, int] = {}
    for _, lemmas, definition, _ in entries:
        for lemma in {normalise(w) for w in lemmas}:
            lemma_count[lemma] = lemma_count.get(lemma, 0) + 1
        definition_count[normalise(definition)] = definition_count.get(normalise(definition), 0) + 1
    usable = [
        (offset, lemmas[0], definition)
        for offset, lemmas, definition, _ in entries
        if lemmas and lemma_count[normalise(lemmas[0])] == 1 and definition_count[normalise(definition)] == 1
    ]
    if not isinstance(synsets, int) or not 2 <= synsets <= len(usable):
        raise ValueError(
            f"wordnet_gloss: synsets must be an integer in [2, {len(usable)}] for pos {pos!r}, got {synsets!r}"
        )
    chosen = [usable[i * len(usable) // synsets] for i in range(synsets)]
    return Pool(
        {offset: [lemma] for offset, lemma, _ in chosen},
        {offset: definition for offset, _, definition in chosen},
        ["wordnet-base"],
        [offset for offset, _, _ in chosen],
    )


FORTUNE_TOPIC_DEFAULT = ["computers", "politics", "science", "work", "art", "food", "law", "startrek"]

FORTUNE_TOPIC_PROMPTS = {
    "computers": "A quote about computers.",
    "politics": "A quote about politics.",
    "science": "A quote about science.",
    "work": "A quote about work.",
    "art": "A quote about art.",
    "food": "A quote about food.",
    "law": "A quote about the law.",
    "startrek": "A quote from Star Trek.",
    "education": "A quote about education.",
    "medicine": "A quote about medicine.",
    "sports": "A quote about sports.",
    "love": "A quote about love.",
}


@builder("fortune_topic")
def build_fortune_topic(cache: Path | None = None) -> Pool:
    """English fortune cookies labelled by the topic file they come from."""
    folder = source_root("fortunes", cache) / R.FORTUNES_DIR
    texts = {}
    for key in FORTUNE_TOPIC_PROMPTS:
        path = folder / key
        if path.is_file():
            entries, _ = R.read_fortune_file(path, "en")
            texts[key] = [e for e in entries if R.is_prose(e)]
    default = [k for k in FORTUNE_TOPIC_DEFAULT if k in texts]
    return Pool(texts, dict(FORTUNE_TOPIC_PROMPTS), ["fortunes"], default)


FORTUNE_LANGUAGE_PROMPTS = {
    "en": "A quote in English.",
    "de": "A quote in German.",
    "es": "A quote in Spanish.",
    "it": "A quote in Italian.",
    "ru": "A quote in Russian.",
    "pl": "A quote in Polish.",
}


@builder("fortune_language")
def build_fortune_language(cache: Path | None = None) -> Pool:
    """Fortune cookies labelled by language: every non-offensive file of fortunes(-de/-es/-it/-ru/-pl).

    The English class and ``fortune_topic`` share the ``fortunes`` package, so one quote could be a language text
    in one task and a topic text in another. English therefore draws only from the files that ``fortune_topic`` does
    not offer as classes (any key of ``FORTUNE_TOPIC_PROMPTS``), and drops every entry that also occurs, up to case
    and whitespace, in one of those topic files (fortune files repeat some quotes).
    """
    texts: dict[str, list[str]] = {}
    encodings: dict[str, list[str]] = {}
    for lang in FORTUNE_LANGUAGE_PROMPTS:
        package = "fortunes" if lang == "en" else f"fortunes-{lang}"
        folder = source_root(package, cache) / R.FORTUNES_DIR
        if lang != "en":
            folder = folder / lang
        texts[lang] = []
        for path in R.fortune_files(folder):
            if lang == "en" and path.name in FORTUNE_TOPIC_PROMPTS:
                continue
            entries, enc = R.read_fortune_file(path, lang)
            if enc != "utf-8":
                encodings.setdefault(lang, []).append(f"{path.name}:{enc}")
            texts[lang] += [e for e in entries if R.is_prose(e)]
    folder = source_root("fortunes", cache) / R.FORTUNES_DIR
    topic_files = [folder / key for key in FORTUNE_TOPIC_PROMPTS if (folder / key).is_file()]
    topical = {normalise(t) for path in topic_files for t in R.read_fortune_file(path, "en")[0]}
    texts["en"] = [t for t in texts["en"] if normalise(t) not in topical]
    return Pool(
        texts,
        dict(FORTUNE_LANGUAGE_PROMPTS),
        ["fortunes"] + [f"fortunes-{lang}" for lang in FORTUNE_LANGUAGE_PROMPTS if lang != "en"],
        notes={"legacy_encodings": encodings} if encodings else {},
    )


VADER_PROMPTS = {
    "tweets": "This tweet is {}.",
    "movies": "This movie review is {}.",
    "amazon": "This product review is {}.",
    "nyt": "This newspaper editorial is {}.",
}


@builder("vader_sentiment")
def build_vader(cache: Path | None = None, domain: str = "tweets", min_abs_rating: float = 0.5) -> Pool:
    """VADER ground truth of one domain: positive / negative by the sign of the mean human rating, |r| >= 0.5."""
    if domain not in R.VADER_DOMAINS:
        raise ValueError(f"vader_sentiment: domain must be one of {sorted(R.VADER_DOMAINS)}, got {domain!r}")
    rows = R.read_vader(source_root("vaderSentiment", cache), MANIFEST["vaderSentiment"].version)[domain]
    texts = {
        "negative": [t for t, r in rows if r <= -min_abs_rating],
        "positive": [t for t, r in rows if r >= min_abs_rating],
    }
    prompts = {k: VADER_PROMPTS[domain].format(k) for k in texts}
    return Pool(texts, prompts, ["vaderSentiment"])


@builder("austen_novel")
def build_austen(cache: Path | None = None) -> Pool:
    """Paragraphs of Jane Austen's six novels labelled by novel."""
    paragraphs = R.read_austen(source_root("r-cran-janeaustenr", cache))
    prompts = {k: f"A passage from {title}." for k, title in R.AUSTEN_NOVELS.items()}
    return Pool(paragraphs, prompts, ["r-cran-janeaustenr"])


# ---------------------------------------------------------------- splits and cache
def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


Split = list[tuple[str, int]]


def balanced_split(
    texts: dict[str, list[str]],
    classes: list[str],
    train_per_class: int,
    test_per_class: int,
    seed: int,
    task: str,
    val_per_class: int = 0,
) -> tuple[Split, Split, Split]:
    """Deterministic balanced ``(train, val, test)`` split (see module docstring); raises if a class has too few
    distinct texts."""
    sizes = {"train_per_class": train_per_class, "val_per_class": val_per_class, "test_per_class": test_per_class}
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"task {task!r}: {name} must be an integer >= 0, got {n!r}")
    owners: dict[str, set[str]] = {}
    for c in classes:
        for t in texts.get(c, []):
            owners.setdefault(t, set()).add(c)
    need = test_per_class + val_per_class + train_per_class
    what = f"({train_per_class} train + {val_per_class} validation + {test_per_class} test per class)"
    rest: list[list[str]] = []
    test: Split = []
    for label, c in enumerate(classes):
        unique = sorted({t for t in texts.get(c, []) if len(owners[t]) == 1})
        if len(unique) < need:
            raise ValueError(f"task {task!r}: class {c!r} has {len(unique)} distinct texts, {need} needed {what}")
        _rng(seed, task, c).shuffle(unique)
        test += [(t, label) for t in unique[:test_per_class]]
        rest.append(unique[test_per_class:])
    held = {normalise(t) for t, _ in test}

    def take(n: int) -> Split:
        # the next n texts of every class, skipping those that repeat a held-out text up to case and whitespace
        out = []
        for label, texts_left in enumerate(rest):
            keep = [i for i, t in enumerate(texts_left) if normalise(t) not in held][:n]
            if len(keep) < n:
                raise ValueError(
                    f"task {task!r}: class {classes[label]!r} has too few distinct texts, {need} needed {what} "
                    "once texts that repeat a test or validation text up to case and whitespace are left out"
                )
            out += [(texts_left[i], label) for i in keep]
            rest[label] = texts_left[keep[-1] + 1 :] if keep else texts_left
        return out

    val = take(val_per_class)
    held |= {normalise(t) for t, _ in val}
    train = take(train_per_class)
    _rng(seed, task, "train-order").shuffle(train)
    return train, val, test


def drop_shared(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    """The pool without the texts that occur, up to case and whitespace, under more than one of its classes."""
    owners: dict[str, set[str]] = {}
    for c, entries in texts.items():
        for t in entries:
            owners.setdefault(normalise(t), set()).add(c)
    return {c: [t for t in entries if len(owners[normalise(t)]) == 1] for c, entries in texts.items()}


def normalise(text: str) -> str:
    """The form in which two texts count as the same: case-folded, runs of whitespace collapsed to one space."""
    return " ".join(text.casefold().split())


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _overlaps(tasks: list[Task]) -> list[tuple[str, str, str, str, str]]:
    """``(task, split, training task, "exact" | "normalised", text)`` for every held-out text found in a train split."""
    trained: dict[str, list[tuple[str, str]]] = {}  # normalised text -> [(task, text as stored)]
    for task in tasks:
        for text, _ in task.train:
            seen = trained.setdefault(normalise(text), [])
            if (task.name, text) not in seen:
                seen.append((task.name, text))
    out = []
    for task in tasks:
        for split in ("test", "val"):
            for text, _ in getattr(task, split):
                for other, stored in trained.get(normalise(text), []):
                    out.append((task.name, split, other, "exact" if stored == text else "normalised", text))
    return out


def find_overlaps(tasks: list[Task]) -> list[str]:
    """Every test or validation text of any task that occurs in the training split of any task (the same or
    another), exactly or after :func:`normalise`; one line per case, naming both tasks, their splits and the text."""
    return [
        f"{t}/{split} in {other}/train ({how}): {_shorten(text)!r}" for t, split, other, how, text in _overlaps(tasks)
    ]


def check_no_overlap(tasks: list[Task], show: int = 5) -> None:
    """Raise ``ValueError`` if any test or validation text occurs in a training split (see :func:`find_overlaps`):
    the count per pair of splits and the first ``show`` cases."""
    found = _overlaps(tasks)
    if not found:
        return
    counts: dict[str, int] = {}
    for t, split, other, _, _ in found:
        pair = f"{t}/{split} in {other}/train"
        counts[pair] = counts.get(pair, 0) + 1
    per_pair = "; ".join(f"{pair}: {n}" for pair, n in counts.items())
    first = "\n  ".join(find_overlaps(tasks)[:show])
    raise ValueError(
        f"{len(found)} test/validation texts occur in a training split ({per_pair}); the first "
        f"{min(show, len(found))}:\n  {first}"
    )


@dataclass
class TaskSpec:
    """A task as named in a config: ``*_per_class`` default to the config's ``data`` values times ``size_factor``."""

    name: str
    builder: str
    params: dict = field(default_factory=dict)
    classes: list[str] | None = None  # default: every class of the builder's pool
    prompts: dict[str, str] | None = None  # overrides per class key
    train_per_class: int = 80
    test_per_class: int = 40
    val_per_class: int = 0

    @classmethod
    def from_dict(cls, d: dict, defaults: dict | None = None) -> TaskSpec:
        d = dict(d)
        sizes = ("train_per_class", "val_per_class", "test_per_class")
        known = {"name", "builder", "classes", "prompts", *sizes}
        factor = float(d.pop("size_factor", 1))
        merged = {k: int(round(factor * v)) for k, v in (defaults or {}).items() if k in sizes and v is not None}
        merged.update({k: d.pop(k) for k in list(d) if k in known})
        if "name" not in merged or "builder" not in merged:
            raise ValueError(f"a task needs 'name' and 'builder', got {d | merged}")
        if merged["builder"] not in BUILDERS:
            raise ValueError(
                f"task {merged['name']!r}: unknown builder {merged['builder']!r}; known: {', '.join(sorted(BUILDERS))}"
            )
        return cls(params=d, **merged)

    def key(self, seed: int) -> str:
        sources = sorted({s for s in _SOURCES_OF.get(self.builder, [])})
        payload = {
            "builder": self.builder,
            "params": self.params,
            "classes": self.classes,
            "prompts": self.prompts,
            "train": self.train_per_class,
            "test": self.test_per_class,
            "seed": seed,
            "version": BUILDER_VERSION,
            "sources": {s: MANIFEST[s].sha256 for s in sources},
        }
        if self.val_per_class:  # absent when zero: keys of specs without a validation split are unchanged
            payload["val"] = self.val_per_class
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_SOURCES_OF = {
    "wordnet_supersense": ["wordnet-base"],
    "wordnet_gloss": ["wordnet-base"],
    "fortune_topic": ["fortunes"],
    "fortune_language": ["fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-ru", "fortunes-pl"],
    "vader_sentiment": ["vaderSentiment"],
    "austen_novel": ["r-cran-janeaustenr"],
}


def _write_jsonl(path: Path, rows: list[tuple[str, int]]) -> None:
    durable.replace_file(path, "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows))


def _read_jsonl(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8") as f:
        return [(r["text"], int(r["label"])) for r in map(json.loads, f)]


def load_task(spec: TaskSpec, seed: int, cache: os.PathLike | str | None = None) -> Task:
    """The task's splits: from the processed cache if present, else built from the raw sources and cached."""
    folder = cache_dir(cache) / "processed" / f"{spec.name}-{spec.key(seed)}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        val_path = folder / "val.jsonl"
        return Task(
            spec.name,
            meta["classes"],
            meta["prompts"],
            _read_jsonl(folder / "train.jsonl"),
            _read_jsonl(folder / "test.jsonl"),
            meta,
            _read_jsonl(val_path) if val_path.is_file() else [],
        )
    pool = BUILDERS[spec.builder](cache=cache_dir(cache), **spec.params)
    classes = list(spec.classes or pool.default_classes or pool.texts)
    unknown = [c for c in classes if c not in pool.texts]
    if unknown:
        raise ValueError(
            f"task {spec.name!r}: unknown classes {unknown}; builder {spec.builder!r} has {sorted(pool.texts)}"
        )
    prompts = [(spec.prompts or {}).get(c, pool.prompts[c]) for c in classes]
    train, val, test = balanced_split(
        drop_shared(pool.texts), classes, spec.train_per_class, spec.test_per_class, seed, spec.name, spec.val_per_class
    )
    meta = {
        "name": spec.name,
        "builder": spec.builder,
        "params": spec.params,
        "classes": classes,
        "prompts": prompts,
        "train_per_class": spec.train_per_class,
        "test_per_class": spec.test_per_class,
        "val_per_class": spec.val_per_class,
        "seed": seed,
        "pool_sizes": {c: len(pool.texts[c]) for c in classes},
        "sources": {s: {"version": MANIFEST[s].version, "sha256": MANIFEST[s].sha256} for s in pool.sources},
        "builder_version": BUILDER_VERSION,
        **({"notes": pool.notes} if pool.notes else {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "test.jsonl", test)
    if val:
        _write_jsonl(folder / "val.jsonl", val)
    durable.replace_file(meta_path, json.dumps(meta, indent=1, ensure_ascii=False))
    return Task(spec.name, classes, prompts, train, test, meta, val)
