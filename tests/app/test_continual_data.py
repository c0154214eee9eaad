"""Data layer of the benchmark: pinned sources, raw-format readers, task builders, splits and their cache.

Builders run against fake unpacked package trees (``app_fixtures``); where the real sources are in the cache
(``keeplora data fetch``), the real files are checked too (skipped otherwise).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from keeplora_bench.continual import readers as R
from keeplora_bench.continual import sources as S
from keeplora_bench.continual import tasks as T
from support.app_fixtures import LANG_WORDS, TOPIC_WORDS, _stamp, write_all_sources, write_r_lazyload


# ------------------------------------------------------------------------------------------------ sources
def _fake_sdist(tmp_path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"hello"
        info = tarfile.TarInfo("fakepkg-1.0/README")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake_artifact(tmp_path, monkeypatch):
    payload = _fake_sdist(tmp_path)
    digest = __import__("hashlib").sha256(payload).hexdigest()
    art = S.Artifact("fakepkg", "sdist", "1.0", digest, len(payload), "a test artifact")
    monkeypatch.setitem(S.MANIFEST, "fakepkg", art)
    calls = []

    def runner(cmd, cwd):
        calls.append(list(cmd))
        (Path(cwd) / "fakepkg-1.0.tar.gz").write_bytes(payload)

    return art, runner, calls


def test_fetch_verifies_unpacks_and_is_idempotent(tmp_path, fake_artifact):
    art, runner, calls = fake_artifact
    roots = S.fetch(["fakepkg"], tmp_path, runner=runner, log=lambda _: None)
    assert roots == [tmp_path / "sources" / "fakepkg-1.0"]
    assert (roots[0] / "fakepkg-1.0" / "README").read_text() == "hello"
    assert S.sha256_file(tmp_path / "downloads" / "fakepkg-1.0.tar.gz") == art.sha256
    assert calls and calls[0][-3:] == ["fakepkg==1.0", "-d", "."]
    S.fetch(["fakepkg"], tmp_path, runner=runner, log=lambda _: None)
    assert len(calls) == 1  # already unpacked: no second download
    assert S.source_root("fakepkg", tmp_path) == roots[0]


def test_fetch_reuses_a_verified_download(tmp_path, fake_artifact):
    _, runner, calls = fake_artifact
    S.fetch(["fakepkg"], tmp_path, runner=runner, log=lambda _: None)
    (tmp_path / "sources" / "fakepkg-1.0" / ".complete").unlink()
    S.fetch(["fakepkg"], tmp_path, runner=runner, log=lambda _: None)
    assert len(calls) == 1  # re-unpacked from the cached, verified download


def test_fetch_rejects_a_checksum_mismatch(tmp_path, fake_artifact, monkeypatch):
    art, runner, _ = fake_artifact
    monkeypatch.setitem(S.MANIFEST, "fakepkg", S.Artifact(art.name, art.kind, art.version, "0" * 64, art.size, ""))
    with pytest.raises(S.ChecksumMismatch, match="sha256"):
        S.fetch(["fakepkg"], tmp_path, runner=runner, log=lambda _: None)
    assert not any((tmp_path / "downloads").glob("fakepkg*"))  # the bad file is not kept
    with pytest.raises(S.SourceMissing):
        S.source_root("fakepkg", tmp_path)


def test_missing_source_names_the_command(tmp_path):
    with pytest.raises(S.SourceMissing) as err:
        S.source_root("wordnet-base", tmp_path)
    msg = str(err.value)
    assert f"keeplora data fetch wordnet-base --cache {tmp_path}" in msg
    assert "apt-get download wordnet-base=1:3.0-37" in msg


def test_raw_download_commands_pin_versions():
    assert S.raw_download_command("fortunes-de") == ["apt-get", "download", "fortunes-de=0.35-1"]
    cmd = S.raw_download_command("vaderSentiment")
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd and ":all:" in cmd
    assert "vaderSentiment==3.3.2" in cmd and "--no-deps" in cmd


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEPLORA_CACHE", str(tmp_path / "c"))
    assert S.cache_dir() == tmp_path / "c"
    assert S.cache_dir(tmp_path / "x") == tmp_path / "x"


def test_safe_extract_refuses_escaping_members(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf, pytest.raises(RuntimeError, match="outside"):
        S.safe_extract(tf, tmp_path / "dest")
    assert not (tmp_path / "evil").exists()


# ------------------------------------------------------------------------------------------------ readers
def test_wordnet_reader(tmp_path):
    folder = tmp_path / R.WORDNET_DIR
    folder.mkdir(parents=True)
    (folder / "data.noun").write_text(
        "  1 This software and database is being provided to you\n"
        '00015388 03 n 01 animal 0 002 @ 00004475 n 0000 | a living organism; "an example"  \n'
        "00017222 20 n 02 plant 0 flora 0 000 | (botany) a living organism lacking the power of locomotion  \n"
    )
    rows = list(R.read_wordnet(tmp_path))
    assert rows == [
        ("a living organism", "noun.Tops"),
        ("(botany) a living organism lacking the power of locomotion", "noun.plant"),
    ]
    # word counts are hexadecimal; every other field after a word is its lex id
    assert [lemmas for _, lemmas, _, _ in R.read_wordnet_synsets(tmp_path)] == [["animal"], ["plant", "flora"]]


def test_wordnet_gloss_retrieval_keeps_unambiguous_synsets(tmp_path):
    folder = _stamp(tmp_path, "wordnet-base") / R.WORDNET_DIR
    folder.mkdir(parents=True)
    lines = [
        "00000001 29 v 01 run 0 000 | move fast on foot  \n",
        "00000002 29 v 01 run 0 000 | be in charge of  \n",  # 'run' names two synsets: neither qualifies
        "00000003 29 v 02 stroll 0 amble 0 000 | walk leisurely  \n",
        "00000004 29 v 01 amble 0 000 | walk slowly  \n",  # 'amble' is also a lemma of 00000003: dropped
        "00000005 29 v 01 jog 0 000 | run slowly  \n",
        "00000006 29 v 01 trot 0 000 | Run   slowly  \n",  # repeats a definition up to case and spaces: dropped
        "00000007 29 v 01 give_up 0 000 | stop trying  \n",
    ]
    (folder / "data.verb").write_text("".join(lines))
    pool = T.BUILDERS["wordnet_gloss"](cache=tmp_path, pos="verb", synsets=2)
    assert pool.default_classes == ["00000003", "00000007"]  # evenly spaced over the qualifying 00000003, 07
    assert pool.texts == {"00000003": ["stroll"], "00000007": ["give up"]}
    assert pool.prompts == {"00000003": "walk leisurely", "00000007": "stop trying"}
    with pytest.raises(ValueError, match=r"synsets must be an integer in \[2, 2\]"):
        T.BUILDERS["wordnet_gloss"](cache=tmp_path, pos="verb", synsets=3)


def test_fortune_split_and_cleanup():
    text = "first one\nspans lines\n%\nB\x08Bold\tand  spaced\r\n%\n\n%\nlast"
    assert R.split_fortunes(text) == ["first one spans lines", "Bold and spaced", "last"]


def test_fortune_files_skip_indexes_twins_and_links(tmp_path):
    (tmp_path / "art").write_text("x\n%\n")
    (tmp_path / "art.dat").write_bytes(b"\x00")
    (tmp_path / "art.u8").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "art")
    (tmp_path / "off").mkdir()
    assert [p.name for p in R.fortune_files(tmp_path)] == ["art"]


def test_fortune_legacy_encoding_fallback(tmp_path):
    path = tmp_path / "f"
    path.write_bytes("Привет, мир\n%\n".encode("koi8-r"))
    entries, enc = R.read_fortune_file(path, "ru")
    assert entries == ["Привет, мир"] and enc == "koi8-r"
    path.write_bytes("Grüße\n%\n".encode())
    assert R.read_fortune_file(path, "de") == (["Grüße"], "utf-8")


def test_is_prose():
    assert R.is_prose("A quote with several real words in it.")
    assert not R.is_prose("two words")
    assert not R.is_prose("|__| /  \\ ___ |__| ---- ====")


def test_vader_parser():
    raw = b"1\t2.5\tI love it &amp; more\r\n2\tbad\tskip me\r\n3\t-1.25\tso  sad\r\n"
    assert list(R.parse_vader_ground_truth(raw)) == [("I love it & more", 2.5), ("so sad", -1.25)]


def test_r_lazyload_reader(tmp_path):
    write_r_lazyload(tmp_path, {"emma": ["EMMA", "", "line one", "line two"], "persuasion": ["x"]})
    data = R.read_r_lazyload(tmp_path)
    assert sorted(data) == ["emma", "persuasion"]
    assert list(data["emma"]) == ["EMMA", "", "line one", "line two"]


def test_austen_paragraphs():
    lines = [
        "EMMA",
        "",
        "VOLUME I",
        "",
        "CHAPTER I",
        "",
        "Emma Woodhouse, handsome, clever, and rich, with a",
        "comfortable home and happy disposition, seemed to unite",
        "",
        "Too short here.",
        "",
    ]
    assert R.austen_paragraphs(lines) == [
        "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite"
    ]


# ------------------------------------------------------------------------------------------------ builders
@pytest.fixture
def fixture_cache(tmp_path):
    return write_all_sources(tmp_path / "cache")


def test_builders_on_fixture_trees(fixture_cache):
    topic = T.BUILDERS["fortune_topic"](cache=fixture_cache)
    assert sorted(topic.default_classes) == sorted(TOPIC_WORDS)
    assert all(len(v) == 30 for k, v in topic.texts.items())
    lang = T.BUILDERS["fortune_language"](cache=fixture_cache)
    assert sorted(lang.texts) == sorted(LANG_WORDS)
    assert all(any(w in t.split() for w in LANG_WORDS["ru"]) for t in lang.texts["ru"])
    # English: only the file that is no topic class, without its capitalised repeat of a topic quote
    assert len(lang.texts["en"]) == 30
    assert all(any(w in t.split() for w in LANG_WORDS["en"]) for t in lang.texts["en"])
    vader = T.BUILDERS["vader_sentiment"](cache=fixture_cache, domain="amazon")
    assert {k: len(v) for k, v in vader.texts.items()} == {"negative": 30, "positive": 30}  # neutral rows dropped
    assert vader.prompts == {
        "negative": "This product review is negative.",
        "positive": "This product review is positive.",
    }
    wn = T.BUILDERS["wordnet_supersense"](cache=fixture_cache)
    assert wn.default_classes == T.WORDNET_NOUN_DEFAULT
    assert all(len(wn.texts[c]) == 30 and not any('"' in t for t in wn.texts[c]) for c in wn.default_classes)
    austen = T.BUILDERS["austen_novel"](cache=fixture_cache)
    assert sorted(austen.texts) == ["emma", "persuasion", "prideprejudice"]
    assert austen.prompts["prideprejudice"] == "A passage from Pride and Prejudice."
    with pytest.raises(ValueError, match="domain"):
        T.BUILDERS["vader_sentiment"](cache=fixture_cache, domain="yelp")


def test_balanced_split_is_deterministic_balanced_and_disjoint():
    texts = {"a": [f"a{i}" for i in range(50)] + ["shared", "a3"], "b": [f"b{i}" for i in range(40)] + ["shared"]}
    train, val, test = T.balanced_split(texts, ["a", "b"], 10, 5, seed=0, task="t")
    assert val == []
    assert (train, val, test) == T.balanced_split(texts, ["a", "b"], 10, 5, seed=0, task="t")
    assert [sum(1 for _, y in train if y == c) for c in (0, 1)] == [10, 10]
    assert [sum(1 for _, y in test if y == c) for c in (0, 1)] == [5, 5]
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert "shared" not in {t for t, _ in train + test}  # under two classes: dropped
    # the test set does not depend on the training size, and another seed draws another split
    _, _, test_small = T.balanced_split(texts, ["a", "b"], 3, 5, seed=0, task="t")
    assert test_small == test
    assert T.balanced_split(texts, ["a", "b"], 10, 5, seed=1, task="t")[2] != test
    with pytest.raises(ValueError, match="class 'b' has 40 distinct texts, 50 needed"):
        T.balanced_split(texts, ["a", "b"], 45, 5, seed=0, task="t")


def test_load_task_caches_processed_splits(fixture_cache, monkeypatch):
    spec = T.TaskSpec.from_dict(
        {
            "name": "topic",
            "builder": "fortune_topic",
            "classes": ["food", "science"],
            "prompts": {"food": "About food."},
        },
        {"train_per_class": 6, "test_per_class": 4},
    )
    task = T.load_task(spec, seed=0, cache=fixture_cache)
    assert task.classes == ["food", "science"]
    assert task.prompts == ["About food.", "A quote about science."]
    assert (len(task.train), len(task.test)) == (12, 8)
    folder = fixture_cache / "processed" / f"topic-{spec.key(0)}"
    lines = (folder / "train.jsonl").read_text().splitlines()
    assert [(json.loads(x)["text"], json.loads(x)["label"]) for x in lines] == task.train
    assert task.val == [] and not (folder / "val.jsonl").exists()  # no validation split: no file
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["val_per_class"] == 0 and meta["pool_sizes"] == {"food": 30, "science": 30}
    # a second load needs no builder and no raw source
    monkeypatch.setitem(T.BUILDERS, "fortune_topic", lambda **_: pytest.fail("rebuilt despite the cache"))
    import shutil

    shutil.rmtree(fixture_cache / "sources")
    again = T.load_task(spec, seed=0, cache=fixture_cache)
    assert (again.train, again.test, again.prompts) == (task.train, task.test, task.prompts)
    assert again.fingerprint() == task.fingerprint()
    # another seed is another cache entry
    assert spec.key(1) != spec.key(0)


def test_runs_sharing_the_cache_build_the_same_task_at_once(fixture_cache, monkeypatch):
    # Two runs started together both miss the cache and write the same files. The interleaving that broke a run:
    # the other writer finishes a whole file between this writer's write and its rename.
    spec = T.TaskSpec.from_dict(
        {"name": "topic", "builder": "fortune_topic", "classes": ["food", "science"]},
        {"train_per_class": 6, "val_per_class": 2, "test_per_class": 4},
    )
    real_replace = T.os.replace
    interleaved = []

    def replace_after_the_other_writer(src, dst):
        if not interleaved:
            interleaved.append(dst)
            T._write_jsonl(Path(dst), [("written by the other run", 0)])
        real_replace(src, dst)

    monkeypatch.setattr(T.os, "replace", replace_after_the_other_writer)
    task = T.load_task(spec, seed=0, cache=fixture_cache)
    monkeypatch.setattr(T.os, "replace", real_replace)
    assert interleaved, "the interleaving was not exercised"
    folder = fixture_cache / "processed" / f"topic-{spec.key(0)}"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    again = T.load_task(spec, seed=0, cache=fixture_cache)  # the last writer's bytes are what the cache holds
    assert (again.train, again.val, again.test) == (task.train, task.val, task.test)


def test_task_spec_validation():
    with pytest.raises(ValueError, match="unknown builder"):
        T.TaskSpec.from_dict({"name": "x", "builder": "nope"})
    with pytest.raises(ValueError, match="needs 'name' and 'builder'"):
        T.TaskSpec.from_dict({"builder": "austen_novel"})
    spec = T.TaskSpec.from_dict(
        {"name": "t", "builder": "vader_sentiment", "domain": "nyt", "test_per_class": 3},
        {"train_per_class": 7, "test_per_class": 9},
    )
    assert (spec.params, spec.train_per_class, spec.test_per_class) == ({"domain": "nyt"}, 7, 3)
    assert spec.val_per_class == 0  # no validation split unless asked for
    spec = T.TaskSpec.from_dict(
        {"name": "t", "builder": "austen_novel", "size_factor": 2},
        {"train_per_class": 7, "val_per_class": 3, "test_per_class": 9},
    )
    assert (spec.params, spec.train_per_class, spec.val_per_class, spec.test_per_class) == ({}, 14, 6, 18)
    spec = T.TaskSpec.from_dict({"name": "t", "builder": "austen_novel", "val_per_class": 2}, {"val_per_class": 5})
    assert spec.val_per_class == 2 and spec.params == {}


def test_unknown_classes_are_reported(fixture_cache):
    spec = T.TaskSpec.from_dict({"name": "t", "builder": "fortune_topic", "classes": ["food", "opera"]})
    with pytest.raises(ValueError, match="unknown classes \\['opera'\\]"):
        T.load_task(spec, 0, fixture_cache)


# ------------------------------------------------------------------------------------------------ real sources
def _real_root(name):
    try:
        return S.source_root(name)
    except S.SourceMissing:
        pytest.skip(f"{name} not in the data cache (run `keeplora data fetch`)")


def test_real_downloads_match_the_manifest():
    downloads = S.cache_dir() / "downloads"
    found = 0
    for name, art in S.MANIFEST.items():
        files = [p for p in downloads.glob("*") if S._matches(p, art)] if downloads.is_dir() else []
        candidates = (
            list(downloads.glob(f"{name}_*.deb" if art.kind == "deb" else f"{name}-{art.version}*"))
            if downloads.is_dir()
            else []
        )
        if candidates:
            assert files, f"{candidates} do not match the pinned sha256 of {name}"
            found += 1
    if not found:
        pytest.skip("no source downloaded (run `keeplora data fetch`)")


def test_real_sources_build_the_default_tasks():
    for name in S.MANIFEST:
        _real_root(name)
    wn = T.BUILDERS["wordnet_supersense"]()
    assert all(len(wn.texts[c]) > 1500 for c in wn.default_classes)
    topic = T.BUILDERS["fortune_topic"]()
    assert all(len(topic.texts[c]) >= 190 for c in topic.default_classes)
    lang = T.BUILDERS["fortune_language"]()
    assert all(len(v) > 5000 for v in lang.texts.values())
    assert not lang.notes  # every file of the pinned packages is UTF-8
    # the English class shares no quote with any file that fortune_topic offers as a class (up to case and spaces)
    folder = S.source_root("fortunes") / R.FORTUNES_DIR
    topical = {T.normalise(t) for k in T.FORTUNE_TOPIC_PROMPTS for t in R.read_fortune_file(folder / k, "en")[0]}
    assert len(topical) > 4000 and not topical & {T.normalise(t) for t in lang.texts["en"]}
    for domain in R.VADER_DOMAINS:
        pool = T.BUILDERS["vader_sentiment"](domain=domain)
        assert min(len(v) for v in pool.texts.values()) > 1000
    austen = T.BUILDERS["austen_novel"]()
    assert sorted(austen.texts) == sorted(R.AUSTEN_NOVELS)
    assert all(len(v) > 800 for v in austen.texts.values())
