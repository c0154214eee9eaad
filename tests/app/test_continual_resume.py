"""``keeplora run --resume`` guards: differing configs named key by key, damaged checkpoints named with the way back
to the task before, and runs killed at random points (forked children, SIGKILL) resuming to the uninterrupted
results."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from keeplora_bench.continual.runconfig import ConfigError
from keeplora_bench.continual.runner import CheckpointError, prepare_output, run
from support.app_fixtures import make_tiny_bert, tiny_config, write_all_sources

METHODS = [{"name": "keeplora", "type": "keeplora"}]
TRIALS = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_all_sources(root / "cache")
    make_tiny_bert(root / "bert")
    cfg = tiny_config(root / "bert", root / "cache", METHODS)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    reference = run(root / "cfg.yaml", output=root / "reference", progress=False, log=lambda _: None)
    return root, reference, time.perf_counter() - start


def _quiet_run(cfg: Path, out: Path, resume: bool = False):
    return run(cfg, output=out, resume=resume, progress=False, log=lambda _: None)


def test_resume_with_another_config_names_the_differing_keys(tmp_path):
    cfg = {
        "name": "x",
        "seed": 0,
        "training": {"lr": 1e-3, "epochs": 2},
        "methods": [{"name": "a", "lr": 1.0}, {"name": "b", "lr": 2.0}],
    }
    prepare_output(cfg, tmp_path / "run", resume=False)
    assert prepare_output(json.loads(json.dumps(cfg)), tmp_path / "run", resume=True) == tmp_path / "run"
    changed = json.loads(json.dumps(cfg))
    changed["training"]["lr"] = 2e-3
    changed["methods"][1]["lr"] = 3.0
    changed["quick"] = True
    with pytest.raises(ConfigError, match=r"keys: \['methods\[1\].lr', 'quick', 'training.lr'\]"):
        prepare_output(changed, tmp_path / "run", resume=True)
    changed = dict(cfg, methods=cfg["methods"][:1])
    with pytest.raises(ConfigError, match=r"keys: \['methods'\]"):
        prepare_output(changed, tmp_path / "run", resume=True)


def test_damaged_checkpoint_is_named_with_the_way_back_to_the_task_before(world, tmp_path):
    root, reference, _ = world
    out = tmp_path / "run"
    shutil.copytree(root / "reference", out)
    final, previous = out / "checkpoints" / "keeplora", out / "checkpoints" / "keeplora.previous"
    assert previous.is_dir()
    damaged = final / "keeplora" / "bases.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x10
    damaged.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError,
        match=rf"{damaged} is damaged: its sha256 differs.*rm -r {final} && mv "
        rf"{previous} {final}",
    ):
        _quiet_run(root / "cfg.yaml", out, resume=True)
    # following the advice recomputes the last task only, and gives the uninterrupted run's results
    shutil.rmtree(final)
    previous.rename(final)
    resumed = _quiet_run(root / "cfg.yaml", out, resume=True)
    assert resumed.matrices["keeplora"].tolist() == reference.matrices["keeplora"].tolist()
    tasks = [json.loads(line)["task"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert tasks == reference.tasks + reference.tasks[-1:]


def test_damaged_checkpoint_without_a_previous_one_says_to_restart_the_method(world, tmp_path):
    root, _, _ = world
    out = tmp_path / "run"
    shutil.copytree(root / "reference", out)
    shutil.rmtree(out / "checkpoints" / "keeplora.previous")
    state = out / "checkpoints" / "keeplora" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{state} is damaged: .*bytes instead of.*restarts from task 1"):
        _quiet_run(root / "cfg.yaml", out, resume=True)


def _tasks_done(out: Path) -> int | None:
    progress = out / "progress.json"
    return json.loads(progress.read_text()).get("keeplora", 0) if progress.is_file() else None


def test_run_killed_at_random_points_resumes_to_the_same_results(world, tmp_path):
    """Ten runs killed (SIGKILL) at a random time after they began and wrote their 0th, 1st, 2nd, ... checkpoint
    (cycling over the tasks), then resumed: each gives the uninterrupted run's accuracy matrix."""
    root, reference, seconds = world
    per_task = reference.wall_s["keeplora"] / len(reference.tasks)
    rng = random.Random(1)
    done_at_kill = []
    for trial in range(TRIALS):
        out = tmp_path / f"run{trial}"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns to pytest
            code = 1
            try:
                _quiet_run(root / "cfg.yaml", out)
                code = 0
            finally:
                os._exit(code)
        deadline = time.time() + 10 * seconds + 60
        while (
            not ((out / "config.yaml").is_file() and (_tasks_done(out) or 0) >= trial % len(reference.tasks))
            and time.time() < deadline
            and os.waitpid(pid, os.WNOHANG) == (0, 0)
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, per_task))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done_at_kill.append(_tasks_done(out) or 0)
        if not (out / "config.yaml").is_file():  # killed before the run began: start it
            shutil.rmtree(out, ignore_errors=True)
            resumed = _quiet_run(root / "cfg.yaml", out)
        else:
            resumed = _quiet_run(root / "cfg.yaml", out, resume=True)
        assert resumed.matrices["keeplora"].tolist() == reference.matrices["keeplora"].tolist(), trial
    print(
        f"kills survived: {TRIALS}/{TRIALS}; tasks finished when killed: {done_at_kill} (a task takes {per_task:.2f} s)"
    )
