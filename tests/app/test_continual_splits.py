"""Validation splits and the no-overlap rule between splits of the benchmark's tasks.

The split rule is checked against a direct transcription of the documented draw (and digests pinned from the code
that had no validation split); the overlap check on synthetic tasks; and, where the real sources are cached
(``keeplora data fetch``; skipped otherwise), on the built splits of every config in ``configs/``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from keeplora_bench.continual import sources as S
from keeplora_bench.continual import tasks as T
from keeplora_bench.continual.data import TaskData
from keeplora_bench.continual.runconfig import load_config
from support.app_fixtures import write_all_sources

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

TEXTS = {
    "a": [f"alpha {i}" for i in range(40)] + ["Shared"],
    "b": [f"beta {i}" for i in range(30)] + ["Shared", "beta 3"],
}


def _documented_split(texts, classes, n_train, n_test, seed, task, n_val):
    """The module docstring's rule, written out (valid when no text repeats another up to case and spaces)."""
    owners = {}
    for c in classes:
        for t in texts[c]:
            owners.setdefault(t, set()).add(c)
    train, val, test = [], [], []
    for label, c in enumerate(classes):
        pool = sorted({t for t in texts[c] if len(owners[t]) == 1})
        T._rng(seed, task, c).shuffle(pool)
        test += [(t, label) for t in pool[:n_test]]
        val += [(t, label) for t in pool[n_test : n_test + n_val]]
        train += [(t, label) for t in pool[n_test + n_val : n_test + n_val + n_train]]
    T._rng(seed, task, "train-order").shuffle(train)
    return train, val, test


# ------------------------------------------------------------------------------------------------ validation split
@pytest.mark.parametrize("n_val", [0, 1, 6])
def test_balanced_split_follows_the_documented_draw(n_val):
    got = T.balanced_split(TEXTS, ["a", "b"], 12, 7, seed=3, task="pin", val_per_class=n_val)
    assert got == _documented_split(TEXTS, ["a", "b"], 12, 7, 3, "pin", n_val)
    train, val, test = got
    for split, n in ((train, 12), (val, n_val), (test, 7)):
        assert [sum(1 for _, y in split if y == c) for c in (0, 1)] == [n, n]
    texts = [{t for t, _ in s} for s in got]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_without_validation_the_split_is_the_one_before_validation_existed():
    train, val, test = T.balanced_split(TEXTS, ["a", "b"], 12, 7, seed=3, task="pin")
    assert val == []
    # digests recorded from the two-way split (train, test) that had no validation draw
    assert hashlib.sha256(json.dumps([train, test]).encode()).hexdigest()[:16] == "e719c8c9844e288b"
    assert T.Task("x", ["a", "b"], ["pa", "pb"], train, test).fingerprint() == "94a3441c387e29a1"
    # the validation split neither moves the test split nor shares a text with it
    _, val6, test6 = T.balanced_split(TEXTS, ["a", "b"], 12, 7, seed=3, task="pin", val_per_class=6)
    assert test6 == test and not {t for t, _ in val6} & {t for t, _ in test}


def test_not_enough_texts_names_all_three_sizes():
    with pytest.raises(ValueError, match=r"class 'b' has 30 distinct texts, 32 needed \(20 train \+ 5 validation \+ 7"):
        T.balanced_split(TEXTS, ["a", "b"], 20, 7, seed=0, task="t", val_per_class=5)
    with pytest.raises(ValueError, match="val_per_class must be an integer >= 0, got -1"):
        T.balanced_split(TEXTS, ["a", "b"], 2, 2, seed=0, task="t", val_per_class=-1)


def test_draws_pass_over_variants_of_held_out_texts():
    # every text of class a has a variant (case, spacing) in class b: whatever is held out, its variant is not trained
    texts = {
        "a": [f"quote number {i}" for i in range(20)],
        "b": [f"QUOTE  number {i}" for i in range(20)] + [f"other quote {i}" for i in range(12)],
    }
    naive_train, naive_val, naive_test = _documented_split(texts, ["a", "b"], 10, 3, 0, "v", 2)
    naive_held = {T.normalise(t) for t, _ in naive_val + naive_test}
    assert not naive_held.isdisjoint(T.normalise(t) for t, _ in naive_train)  # the case this test is about
    train, val, test = T.balanced_split(texts, ["a", "b"], 10, 3, seed=0, task="v", val_per_class=2)
    assert test == naive_test
    held = {T.normalise(t) for t, _ in val + test}
    assert held.isdisjoint(T.normalise(t) for t, _ in train)
    assert {T.normalise(t) for t, _ in test}.isdisjoint(T.normalise(t) for t, _ in val)
    assert [sum(1 for _, y in train if y == c) for c in (0, 1)] == [10, 10]
    with pytest.raises(ValueError, match="once texts that repeat a test or validation text"):
        T.balanced_split({"a": ["x y", "X  y", "x Y"], "b": ["p q", "r s", "t u"]}, ["a", "b"], 1, 1, 0, "w", 1)


def test_key_and_fingerprint_change_only_with_a_validation_split(monkeypatch):
    monkeypatch.setattr(T, "BUILDER_VERSION", 1)  # the key recorded below was computed under version 1
    spec = T.TaskSpec.from_dict({"name": "n", "builder": "austen_novel"}, {"train_per_class": 5, "test_per_class": 4})
    assert spec.key(0) == "7c3e8c2e22614a22"
    with_val = T.TaskSpec.from_dict(
        {"name": "n", "builder": "austen_novel"}, {"train_per_class": 5, "val_per_class": 2, "test_per_class": 4}
    )
    assert with_val.key(0) != spec.key(0)
    task = T.Task("x", ["a"], ["p"], [("t1", 0)], [("t2", 0)])
    assert task.fingerprint() != T.Task("x", ["a"], ["p"], [("t1", 0)], [("t2", 0)], {}, [("t3", 0)]).fingerprint()


def test_load_task_caches_the_validation_split(tmp_path, monkeypatch):
    cache = write_all_sources(tmp_path / "cache")
    spec = T.TaskSpec.from_dict(
        {"name": "novel", "builder": "austen_novel"}, {"train_per_class": 6, "val_per_class": 3, "test_per_class": 4}
    )
    task = T.load_task(spec, seed=0, cache=cache)
    assert (len(task.train), len(task.val), len(task.test)) == (18, 9, 12)
    folder = cache / "processed" / f"novel-{spec.key(0)}"
    rows = [json.loads(x) for x in (folder / "val.jsonl").read_text().splitlines()]
    assert [(r["text"], r["label"]) for r in rows] == task.val
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["val_per_class"] == 3 and set(meta["pool_sizes"]) == set(task.classes)
    monkeypatch.setitem(T.BUILDERS, "austen_novel", lambda **_: pytest.fail("rebuilt despite the cache"))
    again = T.load_task(spec, seed=0, cache=cache)
    assert (again.train, again.val, again.test) == (task.train, task.val, task.test)
    assert again.fingerprint() == task.fingerprint()


def test_texts_shared_by_two_classes_of_a_pool_reach_no_task(tmp_path, monkeypatch):
    # two tasks that take different classes of one builder: a text under both classes (here up to case) is in neither
    texts = {c: [f"{c} text {i}" for i in range(10)] for c in ("a", "b", "c")}
    texts["a"].append("A shared quote")
    texts["b"].append("a  SHARED quote")
    assert T.drop_shared(texts) == {c: [f"{c} text {i}" for i in range(10)] for c in ("a", "b", "c")}
    pool = T.Pool(texts, {c: f"about {c}" for c in texts}, [])
    monkeypatch.setitem(T.BUILDERS, "two_halves", lambda **_: pool)
    sizes = {"train_per_class": 6, "test_per_class": 5}  # 11 texts per class: only 10 once the shared one is out
    first = T.TaskSpec.from_dict({"name": "first", "builder": "two_halves", "classes": ["a", "c"]}, sizes)
    with pytest.raises(ValueError, match="class 'a' has 10 distinct texts, 11 needed"):
        T.load_task(first, 0, tmp_path)
    sizes = {"train_per_class": 6, "test_per_class": 4}
    first = T.TaskSpec.from_dict({"name": "first", "builder": "two_halves", "classes": ["a", "c"]}, sizes)
    second = T.TaskSpec.from_dict({"name": "second", "builder": "two_halves", "classes": ["b"]}, sizes)
    tasks = [T.load_task(first, 0, tmp_path), T.load_task(second, 0, tmp_path)]
    assert all("shared" not in t.casefold() for task in tasks for t, _ in task.train + task.test)
    T.check_no_overlap(tasks)


class _WordEncoder:
    """The two methods TaskData uses: one id per whitespace word, zero-padded."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def tokenize(self, texts):
        return {"input_ids": [[self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.split()] for t in texts]}

    def pad(self, ids):
        width = max(len(x) for x in ids)
        out = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x)
        return out, (out != 0).long()


def test_task_data_batches_the_validation_split():
    train, val, test = T.balanced_split(TEXTS, ["a", "b"], 5, 4, seed=0, task="d", val_per_class=3)
    data = TaskData(T.Task("d", ["a", "b"], ["an a", "a b"], train, test, {}, val), _WordEncoder(), 2)
    for split, rows in (("train", train), ("val", val), ("test", test)):
        batches = data.batches(split, 4)
        assert [len(b.labels) for b in batches] == [4] * (len(rows) // 4) + ([len(rows) % 4] if len(rows) % 4 else [])
        assert torch.cat([b.labels for b in batches]).tolist() == [y for _, y in rows]
        assert all(b.task == 2 for b in batches)
    by_length = data.batches("val", 2, sort_by_length=True)
    assert sorted(torch.cat([b.labels for b in by_length]).tolist()) == sorted(y for _, y in val)
    no_val = TaskData(T.Task("d", ["a", "b"], ["an a", "a b"], train, test), _WordEncoder(), 0)
    assert no_val.batches("val", 4) == []
    with pytest.raises(ValueError, match="split must be one of 'train', 'val', 'test', got 'validation'"):
        data.batches("validation", 4)


# ------------------------------------------------------------------------------------------------ overlaps
def _task(name, train=(), test=(), val=()):
    return T.Task(name, ["c"], ["p"], [(t, 0) for t in train], [(t, 0) for t in test], {}, [(t, 0) for t in val])


def test_find_overlaps_names_tasks_splits_and_text():
    long = "a rather long quote that goes on and on well past the width at which a report line shortens it"
    tasks = [
        _task("one", train=["Quote A", long], test=["quote b"], val=["fresh"]),
        _task("two", train=["Quote B"], test=["Quote A", "unique"], val=["  QUOTE   a "]),
        _task("probe", test=["quote b", "fresh", long]),  # a probe: test split only, never trained
    ]
    found = T.find_overlaps(tasks)
    assert found == [
        "one/test in two/train (normalised): 'quote b'",
        "two/test in one/train (exact): 'Quote A'",
        "two/val in one/train (normalised): '  QUOTE   a '",
        "probe/test in two/train (normalised): 'quote b'",
        f"probe/test in one/train (exact): {long[:57] + '...'!r}",
    ]
    with pytest.raises(ValueError) as err:
        T.check_no_overlap(tasks, show=2)
    msg = str(err.value)
    assert msg.startswith("5 test/validation texts occur in a training split")
    for pair in ("one/test in two/train: 1", "two/test in one/train: 1", "two/val in one/train: 1"):
        assert pair in msg
    assert "probe/test in two/train: 1" in msg and "probe/test in one/train: 1" in msg
    assert found[0] in msg and found[1] in msg and found[2] not in msg  # only the first two cases are listed


def test_a_task_overlapping_itself_and_clean_tasks():
    assert T.find_overlaps([_task("self", train=["Same text"], test=["same  TEXT"])]) == [
        "self/test in self/train (normalised): 'same  TEXT'"
    ]
    clean = [_task("x", train=["a b", "c d"], test=["e f"], val=["g h"]), _task("y", test=["i j"]), _task("z")]
    assert T.find_overlaps(clean) == []
    T.check_no_overlap(clean)  # does not raise
    # held-out texts shared between tasks are no leak: only training splits count
    T.check_no_overlap([_task("x", test=["shared"]), _task("y", test=["shared"], val=["other"])])


# ------------------------------------------------------------------------------------------------ real configs
def _require_sources():
    for name in S.MANIFEST:
        try:
            S.source_root(name)
        except S.SourceMissing:
            pytest.skip(f"data source {name} is not cached (keeplora data fetch)")


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_no_overlap_in_the_configs(config, quick):
    """The built splits of every config: no test or validation text of a task or probe in any training split."""
    _require_sources()
    cfg = load_config(CONFIGS / config, quick=quick)
    seed, cache = int(cfg["seed"]), cfg["data"].get("cache")
    tasks = [T.load_task(T.TaskSpec.from_dict(t, cfg["data"]), seed, cache) for t in cfg["tasks"]]
    probes = [  # built as the runner builds the held-out panel: a test split only
        T.load_task(T.TaskSpec.from_dict({**p, "train_per_class": 0, "val_per_class": 0}, cfg["data"]), seed, cache)
        for p in cfg.get("panel", [])
    ]
    assert tasks and all(t.train and t.test for t in tasks)
    T.check_no_overlap(tasks + probes)
