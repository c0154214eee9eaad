"""KeepLoRA's state in Trainer checkpoints: saved on every checkpoint, restored by resume_from_checkpoint."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from keeplora import KeepLoRA, KeepLoRAConfig  # noqa: E402
from keeplora.checkpoint import read_state  # noqa: E402
from keeplora.trainer import restore  # noqa: E402
from support.tiny_models import CASES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# The whole run lives in this source so that a fresh process can run it too (the kill test).
RUN = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from keeplora import KeepLoRA, KeepLoRACallback, KeepLoRAConfig
    from support.tiny_models import CASES

    CASE = CASES["llama"]

    class Rows(Dataset):
        def __init__(self, seed):
            self.rows = []
            for b in CASE.batches(n=2, seed=seed):
                self.rows += [{k: v[i] for k, v in b.items()} for i in range(b["input_ids"].shape[0])]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    class Record(TrainerCallback):
        # what the task started from, seen right after KeepLoRACallback's on_train_begin
        def __init__(self, kl):
            self.kl, self.start = kl, None

        def on_train_begin(self, args, state, control, **kwargs):
            a = self.kl.config.adapter_name
            self.start = {
                "bases": {n: p.clone() for n, p in self.kl.bases.items()},
                "A": {n: l.lora_A[a].weight.detach().clone() for n, l in self.kl.layers.items()},
                "B_start": {n: b.clone() for n, b in self.kl.state.b_start.items()},
                "task_record": dict(self.kl.state.task_record),
            }

    class KillAfterSave(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    def run(output_dir, resume=None, kill_after=None):
        model = CASE.model()
        kl = KeepLoRA(model, KeepLoRAConfig(target_modules=CASE.targets, r=4, alpha=4, progress=False))
        args = TrainingArguments(
            output_dir=f"{output_dir}/t0", per_device_train_batch_size=2, num_train_epochs=1,
            learning_rate=5e-2, report_to=[], save_strategy="steps", save_steps=2, logging_strategy="no",
            use_cpu=True, remove_unused_columns=False, seed=7,
        )
        record = Record(kl)
        callbacks = [KeepLoRACallback(kl), record] + ([KillAfterSave(kill_after)] if kill_after else [])
        trainer = Trainer(model=model, args=args, train_dataset=Rows(0), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        final = {
            "weights": {n: l.base_layer.weight.detach().clone() for n, l in kl.layers.items()},
            "bases": {n: p.clone() for n, p in kl.bases.items()},
            "tasks_done": kl.tasks_done,
            "in_task": kl.in_task,
        }
        return kl, record.start, final
    """
)


def _run_module():
    scope: dict = {}
    exec(compile(RUN, "trainer_run", "exec"), scope)
    return scope


def _equal(x, y):
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], dict):
            _equal(x[k], y[k])
        elif isinstance(x[k], torch.Tensor):
            assert torch.equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    _, start, final = _run_module()["run"](str(out))
    return out, start, final


def test_every_checkpoint_holds_the_mid_task_state(uninterrupted):
    out, start, _ = uninterrupted
    folders = sorted(p.name for p in (out / "t0").iterdir() if p.name.startswith("checkpoint-"))
    assert folders == ["checkpoint-2", "checkpoint-4"]
    model = CASES["llama"].model()
    for name in folders:
        saved = read_state(out / "t0" / name / "keeplora", model)
        assert saved.state.in_task and saved.state.tasks_done == 0 and saved.adapters is not None
        _equal(saved.state.bases, start["bases"])
        _equal(saved.state.b_start, start["B_start"])
        _equal({n: a for n, (a, _) in saved.adapters.items()}, start["A"])


def test_resume_from_the_middle_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    out, start, final = uninterrupted
    shutil.copytree(out / "t0" / "checkpoint-2", tmp_path / "t0" / "checkpoint-2")
    kl, resumed_start, resumed_final = _run_module()["run"](str(tmp_path), resume=str(tmp_path / "t0" / "checkpoint-2"))
    # restored, not begun again: the same bases, A, B at task start and task record
    _equal(resumed_start, start)
    # bitwise: the same operations in the same order on one CPU process, the Trainer restores its RNG, optimizer
    # and data position, and the state comes back from the exact tensors saved
    _equal(resumed_final, final)
    assert kl.tasks_done == 1 and len(kl.history) == 1


def test_a_killed_trainer_resumes_in_a_fresh_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"), str(ROOT / "tests")])}
    # the uninterrupted reference also runs in a fresh process: the test process's thread settings (changed by
    # earlier tests) may round differently, and the comparison is bitwise
    reference = tmp_path / "reference.pt"
    whole = RUN + f"\n_, s, f = run({str(tmp_path / 'whole')!r})\ntorch.save((s, f), {str(reference)!r})\n"
    done = subprocess.run([sys.executable, "-c", whole], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    start, final = torch.load(reference)
    kill = RUN + f"\nrun({str(tmp_path)!r}, kill_after=2)\n"
    done = subprocess.run([sys.executable, "-c", kill], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    checkpoint = tmp_path / "t0" / "checkpoint-2"
    assert (checkpoint / "keeplora" / "keeplora_state.json").is_file()
    assert not (tmp_path / "t0" / "checkpoint-4").exists()
    result = tmp_path / "resumed.pt"
    resume = RUN + f"\n_, s, f = run({str(tmp_path)!r}, resume=True)\ntorch.save((s, f), {str(result)!r})\n"
    done = subprocess.run([sys.executable, "-c", resume], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed_start, resumed_final = torch.load(result)
    # the record is the killed run's, whose wall-clock times differ from the uninterrupted run's
    untimed = [
        {k: v for k, v in s["task_record"].items() if not k.startswith("seconds")} for s in (resumed_start, start)
    ]
    _equal(untimed[0], untimed[1])
    _equal({**resumed_start, "task_record": {}}, {**start, "task_record": {}})
    _equal(resumed_final, final)


def test_a_checkpoint_without_keeplora_state_is_refused(uninterrupted, tmp_path):
    out, _, _ = uninterrupted
    folder = tmp_path / "t0" / "checkpoint-2"
    shutil.copytree(out / "t0" / "checkpoint-2", folder)
    shutil.rmtree(folder / "keeplora")
    with pytest.raises(FileNotFoundError, match="checkpoint-2 holds no KeepLoRA state"):
        _run_module()["run"](str(tmp_path), resume=str(folder))


def test_a_state_of_another_config_is_refused(uninterrupted, tmp_path):
    out, _, _ = uninterrupted
    folder = tmp_path / "t0" / "checkpoint-2"
    shutil.copytree(out / "t0" / "checkpoint-2", folder)
    case = CASES["llama"]
    kl = KeepLoRA(case.model(), KeepLoRAConfig(target_modules=case.targets, r=4, alpha=8, progress=False))
    with pytest.raises(ValueError, match=r"checkpoint-2 was saved with another config: alpha=4 there, 8 here"):
        restore(kl, folder)


def test_a_state_of_another_model_is_refused(uninterrupted):
    out, _, _ = uninterrupted
    case = CASES["llama"]
    model = case.model(seed=1)  # other pre-trained weights: the state's fingerprint does not match
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, alpha=4, progress=False))
    with pytest.raises(ValueError, match="checkpoint-2"):
        restore(kl, out / "t0" / "checkpoint-2")
