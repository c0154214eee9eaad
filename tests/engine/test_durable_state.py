"""The continual state survives crashes and bad data: verified all-or-nothing loads, recovery of an interrupted save,
non-finite statistics refused by end_task, and saves killed at every step (forked children, SIGKILL)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from keeplora import KeepLoRA, KeepLoRAConfig, durable, finite
from support.tiny_models import CASES

CASE = CASES["bert"]


def config(**overrides) -> KeepLoRAConfig:
    cfg = dict(target_modules=CASE.targets, r=4, alpha=4.0, feature_energy=0.9, progress=False)
    cfg.update(overrides)
    return KeepLoRAConfig(**cfg)


def train(kl, data, steps=2):
    opt = torch.optim.AdamW(kl.trainable_parameters(), lr=5e-2)
    for step in range(steps):
        CASE.loss(kl.model, data[step % len(data)]).backward()
        opt.step()
        opt.zero_grad()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    """The model is exactly as it was: same state-dict keys and values, and no LoRA layer attached."""
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state after one task and one mid-task (an adapter file), saved from a tiny BERT."""
    root = tmp_path_factory.mktemp("states")
    data = CASE.batches()
    kl = KeepLoRA(CASE.model(), config())
    kl.begin_task(data, CASE.loss)
    train(kl, data)
    kl.end_task(data, CASE.loss)
    kl.save(root / "between")
    kl.begin_task(data, CASE.loss)
    train(kl, data)
    kl.save(root / "mid")
    return root


def copy_state(saved: Path, tmp_path: Path, which: str = "mid") -> Path:
    return Path(shutil.copytree(saved / which, tmp_path / which))


# ----------------------------------------------------------------------------------------------- manifest, load
def test_saved_state_has_a_manifest_of_every_file(saved):
    manifest = json.loads((saved / "mid" / durable.MANIFEST).read_text())
    assert sorted(manifest["files"]) == [
        "adapter.safetensors",
        "bases.safetensors",
        "keeplora_state.json",
        "weights.safetensors",
    ]
    for name, entry in manifest["files"].items():
        assert entry["size"] == (saved / "mid" / name).stat().st_size
    assert durable.verify(saved / "mid")


def _truncate(folder: Path) -> None:
    path = folder / "weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(folder: Path) -> None:
    path = folder / "bases.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))


def _remove_adapter(folder: Path) -> None:
    (folder / "adapter.safetensors").unlink()


def _wrong_shape(folder: Path) -> None:
    bases = load_file(str(folder / "bases.safetensors"))
    name = sorted(bases)[0]
    bases[name] = torch.zeros(bases[name].shape[0] + 1, bases[name].shape[1])
    save_file(bases, str(folder / "bases.safetensors"))
    durable.write_manifest(folder)


def _wrong_dtype(folder: Path) -> None:
    weights = load_file(str(folder / "weights.safetensors"))
    weights = {k: v.double() for k, v in weights.items()}
    save_file(weights, str(folder / "weights.safetensors"))
    durable.write_manifest(folder)


def _wrong_config(folder: Path) -> None:
    meta = json.loads((folder / "keeplora_state.json").read_text())
    meta["config"]["r"] = 1000  # larger than every target's d_in
    (folder / "keeplora_state.json").write_text(json.dumps(meta))
    durable.write_manifest(folder)


def _nan_in_legacy_state(folder: Path) -> None:
    weights = load_file(str(folder / "weights.safetensors"))
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(folder / "weights.safetensors"))
    (folder / durable.MANIFEST).unlink()


DAMAGE = {
    "truncated file": (_truncate, durable.IntegrityError, "weights.safetensors is damaged: .* bytes instead of"),
    "flipped byte": (_flip_byte, durable.IntegrityError, "bases.safetensors is damaged: its sha256 differs"),
    "missing file": (_remove_adapter, durable.IntegrityError, "adapter.safetensors is missing"),
    "wrong shape": (_wrong_shape, ValueError, r"bases.safetensors: .* has shape \(33, "),
    "wrong dtype": (_wrong_dtype, ValueError, "is torch.float64, but this model needs torch.float32"),
    "wrong config": (_wrong_config, ValueError, "r = 1000 exceeds d_in"),
    "non-finite value (no manifest)": (_nan_in_legacy_state, durable.IntegrityError, "non-finite values"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_failed_load_leaves_the_model_untouched(saved, tmp_path, kind):
    damage, error, message = DAMAGE[kind]
    folder = copy_state(saved, tmp_path)
    damage(folder)
    model = CASE.model()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", durable.UnverifiedWarning)
        with pytest.raises(error, match=message):
            KeepLoRA.load(folder, model)
    assert_untouched(model, before)


def test_truncated_file_without_manifest_is_named(saved, tmp_path):
    folder = copy_state(saved, tmp_path)
    (folder / durable.MANIFEST).unlink()
    _truncate(folder)
    model = CASE.model()
    before = snapshot(model)
    with pytest.warns(durable.UnverifiedWarning, match="integrity cannot be verified"):
        with pytest.raises(durable.IntegrityError, match="weights.safetensors is damaged"):
            KeepLoRA.load(folder, model)
    assert_untouched(model, before)


def test_wrong_model_leaves_it_untouched(saved):
    one_layer = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        ),
        add_pooling_layer=False,
    )
    for model, message in (
        (CASE.model(seed=1), "other weights in the target modules"),
        (one_layer, "saved for targets"),
        (CASES["vit"].model(), "no module matches"),
    ):
        before = snapshot(model)
        with pytest.raises(ValueError, match=message):
            KeepLoRA.load(saved / "mid", model)
        assert_untouched(model, before)


def test_state_without_manifest_still_loads_with_a_warning(saved, tmp_path):
    folder = copy_state(saved, tmp_path)
    (folder / durable.MANIFEST).unlink()
    with pytest.warns(durable.UnverifiedWarning, match="integrity cannot be verified"):
        kl = KeepLoRA.load(folder, CASE.model())
    reference = KeepLoRA.load(saved / "mid", CASE.model())
    assert kl.in_task and kl.tasks_done == reference.tasks_done == 1
    for name in kl.layers:
        assert torch.equal(kl.bases[name], reference.bases[name])
        assert torch.equal(kl.layers[name].base_layer.weight, reference.layers[name].base_layer.weight)


def test_load_recovers_the_previous_state_of_an_interrupted_save(saved, tmp_path):
    """A save killed between its two renames leaves only ``.<name>.old``: load reads it (with a warning) and the
    next save completes normally."""
    copy_state(saved, tmp_path, "between").rename(tmp_path / ".state.old")
    with pytest.warns(durable.RecoveredWarning, match="interrupted"):
        kl = KeepLoRA.load(tmp_path / "state", CASE.model())
    assert kl.tasks_done == 1 and not kl.in_task
    kl.save(tmp_path / "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KeepLoRA.load(tmp_path / "state", CASE.model()).tasks_done == 1


def test_missing_state_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no KeepLoRA state"):
        KeepLoRA.load(tmp_path / "nothing", CASE.model())


# ----------------------------------------------------------------------------------------------- saving errors
def test_save_under_an_unusable_parent_names_the_target(tmp_path):
    kl = KeepLoRA(CASE.model(), config())
    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / "file" / "sub" / "state"
    with pytest.raises(OSError, match=f"cannot save to {target}"):
        kl.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_save_failing_while_writing_names_the_target_and_keeps_the_previous_state(saved, tmp_path, monkeypatch):
    target = copy_state(saved, tmp_path, "between")
    kl = KeepLoRA.load(target, CASE.model())
    kl.tasks_done = 5

    def no_space(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("keeplora.checkpoint.save_file", no_space)
    with pytest.raises(OSError, match=f"cannot save to {target}: No space left on device"):
        kl.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["between"]
    assert KeepLoRA.load(target, CASE.model()).tasks_done == 1


def test_save_fsyncs_every_file_and_folder_before_the_rename(saved, tmp_path, monkeypatch):
    """The order a power loss needs: data of every file, then the folder, then the rename, then the parent."""
    kl = KeepLoRA.load(saved / "mid", CASE.model())
    kl.save(tmp_path / "state")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    kl.save(tmp_path / "state")
    monkeypatch.undo()
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and Path(e[2]).name == "state"]
    assert len(renames) == 1
    final = renames[0]
    tmp = Path(events[final][1])
    synced_before = {Path(e[1]) for e in events[:final] if e[0] == "fsync"}
    files = {
        tmp / name
        for name in (
            "keeplora_state.json",
            "bases.safetensors",
            "weights.safetensors",
            "adapter.safetensors",
            durable.MANIFEST,
        )
    } | {tmp}
    assert files <= synced_before, files - synced_before
    assert ("fsync", str(tmp_path)) in events[final + 1 :]


# ----------------------------------------------------------------------------------------------- non-finite data
def _inputs_times(model, value: float):
    return model.embeddings.register_forward_hook(lambda _m, _a, out: out * value)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_end_task_refuses_non_finite_features(value):
    data = CASE.batches()
    model = CASE.model()
    kl = KeepLoRA(model, config())
    kl.begin_task(data, CASE.loss)
    train(kl, data)
    before, bases = snapshot(model), {n: p.clone() for n, p in kl.bases.items()}
    handle = _inputs_times(model, value)
    with pytest.raises(FloatingPointError, match=r"task 1: non-finite memory statistics \(features\) of .*query"):
        kl.end_task(data, CASE.loss)
    handle.remove()
    assert kl.tasks_done == 0 and kl.in_task and kl.history == []
    for key, value_before in before.items():
        assert torch.equal(model.state_dict()[key], value_before), key
    assert all(torch.equal(kl.bases[n], bases[n]) for n in bases)
    kl.end_task(data, CASE.loss)  # the data fixed, the same task ends normally
    assert kl.tasks_done == 1 and all(kl.bases[n].isfinite().all() for n in bases)


def test_end_task_refuses_a_non_finite_adapter_naming_the_layer():
    data = CASE.batches()
    model = CASE.model()
    kl = KeepLoRA(model, config(feature_energy=0.0))
    kl.begin_task(data, CASE.loss)
    name = sorted(kl.layers)[1]
    with torch.no_grad():
        kl.layers[name].lora_B[kl.adapter_name].weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=rf"non-finite values in \['{name} \(merged weight\)'\]"):
        kl.end_task(data, CASE.loss)
    assert kl.tasks_done == 0 and kl.in_task
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("part", ["A", "B", "initialised weight"])
def test_begin_task_refuses_non_finite_adapter_factors_naming_the_layer(part, monkeypatch):
    """Finite gradients can still give non-finite factors (an SVD that fails, B = Aᵀ·G or W − s·(A·B)ᵀ
    overflowing): injected here into one layer's factors, begin_task refuses before writing anything."""
    data = CASE.batches()
    model = CASE.model()
    kl = KeepLoRA(model, config())
    name = sorted(kl.layers)[1]
    adapter_factors = KeepLoRA._adapter_factors

    def poisoned(self, grads):
        factors = adapter_factors(self, grads)
        a, b = factors[name]
        if part == "A":
            a = a.clone().index_fill_(0, torch.tensor([0]), float("nan"))
        elif part == "B":
            b = b.clone().index_fill_(0, torch.tensor([0]), float("inf"))
        else:  # finite factors whose product overflows the weight's dtype
            a = a.clone().fill_(1e20)
            b = b.clone().fill_(1e20)
        factors[name] = (a, b)
        return factors

    monkeypatch.setattr(KeepLoRA, "_adapter_factors", poisoned)
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=rf"task 1: non-finite values in \['{name} \({part}\)'"):
        kl.begin_task(data, CASE.loss)
    assert not kl.in_task and kl.tasks_done == 0
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    monkeypatch.undo()
    kl.begin_task(data, CASE.loss)  # nothing was left half-written: the same task begins normally
    assert kl.in_task


def test_nonfinite_names_every_bad_tensor():
    tensors = {
        "a": torch.ones(3, 4),
        "b": torch.tensor([1.0, float("nan")]),
        "c": torch.empty(0),
        "d": torch.tensor([[float("-inf")]], dtype=torch.bfloat16),
        "e": torch.arange(3),
    }
    assert finite.nonfinite(tensors) == ["b", "d"]
    assert finite.nonfinite({}) == []


# ----------------------------------------------------------------------------------------------- fault injection
def _signature(kl) -> tuple:
    return (
        kl.tasks_done,
        kl.in_task,
        {n: p.clone() for n, p in kl.bases.items()},
        {n: layer.base_layer.weight.detach().clone() for n, layer in kl.layers.items()},
        {n: layer.lora_B[kl.adapter_name].weight.detach().clone() for n, layer in kl.layers.items()},
    )


def _same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and all(
        a[i].keys() == b[i].keys() and all(torch.equal(a[i][n], b[i][n]) for n in a[i]) for i in (2, 3, 4)
    )


def _in_child(body) -> int:
    """Run ``body`` in a forked child (exit 0 when it returns, 1 when it raises); returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns to pytest
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _steps_killed_at(step: int) -> None:
    """Count the save's steps (each fsync, rename, removal and tensor file written); SIGKILL this process just
    before step ``step``."""
    from keeplora import checkpoint

    count = [0]

    def counted(fn):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return call

    os.fsync, os.replace, shutil.rmtree = counted(os.fsync), counted(os.replace), counted(shutil.rmtree)
    checkpoint.save_file = counted(checkpoint.save_file)
    return count


class Outcomes:
    """Every load after a killed save: a state lost (the load failed) or silently corrupted (it loaded something
    that is neither the previous nor the new state), and how many loads recovered the previous state."""

    def __init__(self, states: dict[str, tuple]):
        self.states = states
        self.trials = self.lost = self.silent = self.recovered = 0
        self.seen: set[str] = set()

    def load(self, target: Path) -> None:
        self.trials += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                kl = KeepLoRA.load(target, CASE.model())
            except Exception:  # noqa: BLE001 - any failure is a lost state
                self.lost += 1
                return
        self.recovered += any(issubclass(w.category, durable.RecoveredWarning) for w in caught)
        found = [name for name, sig in self.states.items() if _same(_signature(kl), sig)]
        if not found:
            self.silent += 1
        self.seen.update(found)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_saves_killed_at_every_step_and_at_random_times_lose_nothing(saved, tmp_path, monkeypatch):
    """A child process saves state B over state A (and A over B, and over an interrupted save's leftovers) and is
    killed with SIGKILL before each step of the save in turn, then at random times while saving A and B in a loop;
    after every kill the folder must load as exactly A or B."""
    kls = {which: KeepLoRA.load(saved / which, CASE.model()) for which in ("between", "mid")}
    outcomes = Outcomes({which: _signature(kl) for which, kl in kls.items()})
    target = tmp_path / "state"
    # 1) a kill before every step (until a child completes its save), for three starting points
    steps = {}
    for old, new, leftover in (("between", "mid", False), ("mid", "between", False), ("between", "mid", True)):
        for step in range(1, 100):
            run = tmp_path / "run"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir()
            shutil.copytree(saved / old, run / (".state.old" if leftover else "state"))
            pid = _in_child(lambda: (_steps_killed_at(step), kls[new].save(run / "state")))
            status = _wait(pid)
            assert status in (0, -signal.SIGKILL), status
            outcomes.load(run / "state")
            if status == 0:
                steps[(old, new, leftover)] = step - 1
                break
    assert min(steps.values()) >= 10, steps
    assert outcomes.recovered > 0 and outcomes.seen == {"between", "mid"}
    # 2) kills at random times while a child saves A, B, A, … into one folder (one kill's leftovers stay for the next)
    kls["between"].save(target)
    start = time.perf_counter()
    kls["mid"].save(target)
    one_save = time.perf_counter() - start
    rng = random.Random(0)
    for _ in range(20):

        def save_forever():
            while True:
                kls["between"].save(target)
                kls["mid"].save(target)

        pid = _in_child(save_forever)
        time.sleep(rng.uniform(0.0, 3 * one_save))
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid) == -signal.SIGKILL
        outcomes.load(target)
    kls["between"].save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "state"]  # no stale temporary folder
    print(
        f"fault injection: {outcomes.trials} trials (steps per save: {sorted(steps.values())}), "
        f"{outcomes.lost} states lost, {outcomes.silent} silent corruptions, {outcomes.recovered} recovered from "
        "the previous state"
    )
    assert outcomes.trials >= 50
    assert outcomes.lost == 0
    assert outcomes.silent == 0


def test_save_into_a_full_file_system_fails_clearly_and_keeps_the_previous_state(saved, tmp_path):
    """A child whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) is below the state's largest file saves over
    the previous state: the save raises an OSError naming the target, and the previous state still loads."""
    import resource

    kls = {which: KeepLoRA.load(saved / which, CASE.model()) for which in ("between", "mid")}
    target = Path(shutil.copytree(saved / "between", tmp_path / "state"))
    largest = max(f.stat().st_size for f in target.iterdir())
    report = tmp_path / "report.txt"

    def save_with_a_full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, resource.RLIM_INFINITY))  # soft: raised again below
        try:
            kls["mid"].save(target)
        except OSError as error:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            report.write_text(f"{type(error).__name__}: {error}")
            raise

    assert _wait(_in_child(save_with_a_full_disk)) == 1  # the save raised
    message = report.read_text()
    assert str(target) in message and "File too large" in message, message
    reloaded = KeepLoRA.load(target, CASE.model())
    assert _same(_signature(reloaded), _signature(kls["between"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt", "state"]  # no temporary folder left


def test_construction_refuses_non_finite_weights_untouched():
    model = CASE.model()
    name = next(n for n, _ in model.named_modules() if n.endswith("layer.1.attention.self.value"))
    with torch.no_grad():
        model.get_submodule(name).weight[3, 1] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"the weights of targets \['{name}'\] \(1 in all\) hold inf or NaN"):
        KeepLoRA(model, config())
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_save_into_an_unwritable_parent_names_the_target(tmp_path, monkeypatch):
    kl = KeepLoRA(CASE.model(), config())

    def refused(prefix, dir):
        raise PermissionError(13, "Permission denied", str(Path(dir) / f"{prefix}abc"))

    monkeypatch.setattr(durable.tempfile, "mkdtemp", refused)
    with pytest.raises(PermissionError, match=f"cannot save to {tmp_path / 'state'}: Permission denied"):
        kl.save(tmp_path / "state")
