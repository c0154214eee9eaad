"""``keeplora run``: one task sequence, every configured method, the T x T accuracy matrices, metrics and plots.

Run folder (``--output``, default ``runs/<config name>[-quick]``)::

    config.yaml                  the resolved config (what ran); config.source.yaml: the file as given
    data.json                    per task: classes, prompts, split sizes, fingerprints, source versions
    zero_shot.json               accuracy of the untouched model on every task, validation split and probe (step 0)
    progress.json                tasks finished per method (updated after every checkpoint)
    checkpoints/<method>/        the latest finished task of a method: changed model tensors, heads, engine state
    checkpoints/<method>.previous/  the task before (a fallback)
    methods/<method>/accuracy.{csv,json}, heatmap.png
    results.{md,json,csv}        Transfer / Average / Last / BWT / FWT / Retention, validation metrics, wall time per
                                 method, and the drift gate
    accuracy_over_steps.png      accuracy of each task after each step, one panel per task, one line per method
    retention.png                held-out panel accuracy after each step, one line per method
    log.jsonl                    one line per (method, task): training loss per epoch, seconds, accuracies

Evaluation after every step: each task's test split (the T x T matrix), each task's validation split when the config
carves one (``data.val_per_class``; what ``keeplora sweep`` selects on), and the held-out panel (``panel``: probe
tasks that no method trains, each with only a test split). ``evaluate_test=False`` (sweeps) evaluates the validation
splits only: neither a task's test split nor the panel.

**Drift gate.** The benchmark can judge protection only if the unprotected baselines do forget and erode: the gate
passes when full fine-tuning or LoRA-FT ends at least ``metrics.GATE_PANEL_DROP`` points below the zero-shot model on
the panel and LoRA-FT's BWT is at most ``metrics.GATE_BWT``. Every run prints it and writes it to ``results.*``; a run
whose gate fails says that it cannot judge protection.

Checkpoints: after every task of every method the runner writes the method's state crash-safely (a new folder with a
checksum manifest, fsynced, then renamed into place; see :mod:`keeplora.durable`) and keeps the one of the task
before as ``checkpoints/<method>.previous``. ``--resume`` reloads the config snapshot (it must equal the resolved
config given; the differing keys are named), skips finished methods, restores a partly finished one from its
verified checkpoint and continues with the next task: nothing finished is recomputed. A damaged checkpoint is
reported with its file and how to restart from the task before. Each task seeds torch from ``(seed, method,
task)`` and shuffles from ``(seed, task, epoch)``, so a resumed run computes exactly what the uninterrupted run
computes (same machine, same thread count).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from keeplora import durable

from . import metrics as M
from .data import TaskData, seed_from
from .methods import Method, build_method
from .model import load_encoder
from .peers.osf import osf_missing
from .runconfig import ConfigError, load_config
from .tasks import TaskSpec, check_no_overlap, load_task

CHECKPOINT_DELAY_ENV = "KEEPLORA_CHECKPOINT_DELAY_S"  # seconds to sleep after each checkpoint (crash tests only)


@dataclass
class RunResult:
    output: Path
    tasks: list[str]
    matrices: dict[str, np.ndarray] = field(default_factory=dict)  # method name -> T x T accuracies in [0, 1]
    metrics: dict[str, dict] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)
    zero_shot: list[float] = field(default_factory=list)
    val_matrices: dict[str, np.ndarray] = field(default_factory=dict)  # validation splits, same layout
    zero_shot_val: list[float] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)  # the held-out panel's probe tasks
    panel_rows: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (T + 1) x probes, row 0 zero-shot
    zero_shot_panel: list[float] = field(default_factory=list)


class CheckpointError(RuntimeError):
    """A method's checkpoint cannot be read; the message names the damaged file and how to restart before it."""


def _dump_json(path: Path, obj) -> None:
    durable.replace_file(path, json.dumps(obj, indent=1, ensure_ascii=False))


def _canonical(cfg) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


def _differing_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted paths where two configs differ (``training.lr``, ``methods[2].epochs``), down to the leaves."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            key
            for k in sorted(set(a) | set(b), key=str)
            for key in _differing_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [key for i, (x, y) in enumerate(zip(a, b)) for key in _differing_keys(x, y, f"{prefix}[{i}]")]
    return [] if _canonical(a) == _canonical(b) else [prefix or "(the whole config)"]


def default_output(cfg: dict) -> Path:
    return Path("runs") / (cfg["name"] + ("-quick" if cfg.get("quick") else ""))


def prepare_output(cfg: dict, output: Path | None, resume: bool, source: Path | None = None) -> Path:
    out = Path(output) if output else default_output(cfg)
    snapshot = out / "config.yaml"
    if resume:
        if not snapshot.is_file():
            raise ConfigError(f"--resume: {out} holds no run (no config.yaml); start it without --resume")
        try:
            previous = yaml.safe_load(snapshot.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(
                f"--resume: {snapshot} is damaged ({error}); start the run again in another --output"
            ) from None
        if _canonical(previous) != _canonical(cfg):
            diff = _differing_keys(previous, cfg)
            raise ConfigError(
                f"--resume: the config differs from the one {out} was started with (keys: {diff}); "
                f"resume with the same config and flags, or use another --output"
            )
        return out
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or another --output")
    out.mkdir(parents=True, exist_ok=True)
    durable.replace_file(snapshot, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    if source is not None:
        shutil.copyfile(source, out / "config.source.yaml")
    return out


class Runner:
    def __init__(
        self,
        cfg: dict,
        out: Path,
        progress: bool = True,
        log: Callable[[str], None] = print,
        evaluate_test: bool = True,
    ):
        self.cfg = cfg
        self.out = out
        self.progress = progress
        self.log = log
        self.seed = int(cfg["seed"])
        if cfg["training"].get("threads"):
            torch.set_num_threads(int(cfg["training"]["threads"]))
        cache = cfg["data"].get("cache")
        self.specs = [TaskSpec.from_dict(t, cfg["data"]) for t in cfg["tasks"]]
        self.tasks = [load_task(s, self.seed, cache) for s in self.specs]
        self.names = [t.name for t in self.tasks]
        # probes: a test split only (never trained, no validation split)
        self.panel_specs = [
            TaskSpec.from_dict({**p, "train_per_class": 0, "val_per_class": 0}, cfg["data"]) for p in cfg["panel"]
        ]
        self.probes = [load_task(s, self.seed, cache) for s in self.panel_specs]
        check_no_overlap(self.tasks + self.probes)
        first = self._fresh_encoder()
        self.datas = [TaskData(t, first, i) for i, t in enumerate(self.tasks)]
        T = len(self.tasks)
        self.probe_datas = [TaskData(t, first, T + k) for k, t in enumerate(self.probes)]  # no head has their index
        size = int(cfg["training"]["eval_batch_size"])
        self.views: dict[str, list[tuple[TaskData, list]]] = {}  # evaluated after every step
        if evaluate_test:
            self.views["test"] = [(d, d.batches("test", size, sort_by_length=True)) for d in self.datas]
        if any(t.val for t in self.tasks):
            self.views["val"] = [(d, d.batches("val", size, sort_by_length=True)) for d in self.datas]
        if self.probes and evaluate_test:
            self.views["panel"] = [(d, d.batches("test", size, sort_by_length=True)) for d in self.probe_datas]
        self._write_data_json()

    # ------------------------------------------------------------------ helpers
    def _fresh_encoder(self):
        m = self.cfg["model"]
        return load_encoder(m["path"], m["kind"], int(m["max_length"]), m["logit_scale"])

    def _write_data_json(self) -> None:
        rows = [
            {
                "name": t.name,
                "role": role,
                "classes": t.classes,
                "prompts": t.prompts,
                "train": len(t.train),
                **({"val": len(t.val)} if t.val else {}),
                "test": len(t.test),
                "fingerprint": t.fingerprint(),
                "builder": t.meta.get("builder"),
                "params": t.meta.get("params"),
                "pool_sizes": t.meta.get("pool_sizes"),
                "sources": t.meta.get("sources"),
            }
            for role, group in (("task", self.tasks), ("probe", self.probes))
            for t in group
        ]
        _dump_json(self.out / "data.json", rows)

    def _progress_state(self) -> dict:
        path = self.out / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _bar(self, total: int, desc: str, leave: bool = True, position: int = 0):
        from tqdm.auto import tqdm

        return tqdm(
            total=total, desc=desc, leave=leave, disable=not self.progress, dynamic_ncols=True, position=position
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, method: Method) -> dict[str, list[float]]:
        """Accuracy on every evaluated view: ``{"test": [per task], "val": [per task], "panel": [per probe]}``."""
        enc = method.encoder
        enc.model.eval()
        out = {}
        with method.eval_model():
            self._evaluate_views(method, out)
        return out

    def _evaluate_views(self, method: Method, out: dict) -> None:
        enc = method.encoder
        for view, pairs in self.views.items():
            accs = []
            for data, batches in pairs:
                prompts = enc.embed(data.prompt_ids, data.prompt_mask)
                head = method.heads.get(data.index)
                correct = total = 0
                for b in batches:
                    emb = enc.embed(b.input_ids, b.attention_mask)
                    logits = enc.logit_scale * emb @ prompts.t()
                    if head is not None:
                        logits = logits + head(emb)
                    correct += int((logits.argmax(1) == b.labels).sum())
                    total += len(b.labels)
                accs.append(correct / total)
            out[view] = accs

    def zero_shot_row(self) -> tuple[dict[str, list[float]], float]:
        """The untouched model's accuracy on every view (cached in zero_shot.json) and the seconds it took."""
        path = self.out / "zero_shot.json"
        if path.is_file():
            z = json.loads(path.read_text())
            views = {"test": z.get("accuracy"), "val": z.get("val"), "panel": z.get("panel")}
            if all(views[v] is not None for v in self.views):
                return {v: views[v] for v in self.views}, z["seconds"]
        t0 = time.perf_counter()
        enc = self._fresh_encoder()
        rows = self.evaluate(build_method({"type": "zero_shot", "name": "zero-shot"}, enc, self.seed))
        seconds = time.perf_counter() - t0
        record = {"tasks": self.names, "accuracy": rows.get("test"), "seconds": seconds}
        if "val" in rows:
            record["val"] = rows["val"]
        if "panel" in rows:
            record.update(probes=[t.name for t in self.probes], panel=rows["panel"])
        _dump_json(path, record)
        return rows, seconds

    # ------------------------------------------------------------------ training
    def train_task(self, method: Method, t: int) -> dict:
        spec = method.spec
        data = self.datas[t]
        # a sweep's points share their method's stream (seed_key, common random numbers): two points differ by the
        # swept value only, and a point equals the run of the config with that value
        torch.manual_seed(seed_from(self.seed, spec.get("seed_key", spec["slug"]), t))
        bs = int(spec["batch_size"])
        fixed_loader = data.batches("train", bs)  # stored (shuffled-once) order: gradient estimate / features
        method.begin_task(t, data, fixed_loader)
        params = method.parameters(t)
        if not params:
            raise RuntimeError(f"method {spec['name']!r} has nothing to train on task {self.names[t]!r}")
        epochs = int(spec["epochs"])
        opt = torch.optim.AdamW(params, lr=float(spec["lr"]), weight_decay=float(spec["weight_decay"]))
        steps = epochs * len(fixed_loader)
        sched = None
        if spec["schedule"] == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(spec["lr"]), total_steps=steps)
        losses = []
        bar = self._bar(steps, f"  {spec['name']} · {self.names[t]}", leave=False, position=1)
        method.model.train()
        for epoch in range(epochs):
            total, n = 0.0, 0
            for b in data.batches("train", bs, shuffle_seed=seed_from(self.seed, "shuffle", t, epoch)):
                loss = method.loss_fn(t)(method.model, b)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{spec['name']}: non-finite loss on task {self.names[t]!r}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if spec.get("max_grad_norm"):
                    torch.nn.utils.clip_grad_norm_(params, float(spec["max_grad_norm"]))
                opt.step()
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * len(b.labels)
                n += len(b.labels)
                bar.update(1)
                bar.set_postfix(loss=f"{total / n:.3f}")
            losses.append(total / n)
        bar.close()
        opt.zero_grad(set_to_none=True)
        method.model.eval()
        method.end_task(t, data, fixed_loader)
        for p in params:
            p.requires_grad_(False)
        return {"train_loss": losses}

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self, method: Method) -> Path:
        return self.out / "checkpoints" / method.spec["slug"]

    def save_checkpoint(self, method: Method, pristine: dict, state: dict) -> None:
        """Write the method's state after a task crash-safely (:func:`keeplora.durable.atomic_folder`); the
        checkpoint of the task before is kept as ``<slug>.previous`` (a fallback if the latest is damaged)."""
        final = self._ckpt_dir(method)
        changed = {}
        for name, tensor in method.model.state_dict().items():
            base = pristine.get(name.replace(".base_layer.", "."))
            if base is None or base.shape != tensor.shape or not torch.equal(base, tensor):
                changed[name] = tensor.detach().clone()
        with durable.atomic_folder(final, keep_previous=self._previous_dir(final)) as tmp:
            extra = method.extra_state(tmp)
            torch.save({"state": state, "tensors": changed, "extra": extra, "info": method.info}, tmp / "state.pt")
        progress = self._progress_state()
        progress[method.spec["slug"]] = state["tasks_done"]
        _dump_json(self.out / "progress.json", progress)
        delay = float(os.environ.get(CHECKPOINT_DELAY_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)

    @staticmethod
    def _previous_dir(final: Path) -> Path:
        return final.with_name(final.name + ".previous")

    def _damaged(self, spec: dict, folder: Path, error: BaseException) -> CheckpointError:
        final = self.out / "checkpoints" / spec["slug"]
        previous = self._previous_dir(final)
        if previous.is_dir():
            how = (
                f"replace it with the checkpoint of the task before (rm -r {final} && mv {previous} {final}) and "
                "run again with --resume"
            )
        else:
            how = f"delete it (rm -r {final}) and run again with --resume: {spec['name']!r} restarts from task 1"
        return CheckpointError(
            f"the checkpoint of method {spec['name']!r} in {folder} is damaged: {error}. To "
            f"restart from the task before, {how}"
        )

    def read_checkpoint(self, spec: dict) -> tuple[Path, dict] | None:
        """``(folder, saved dict)`` of a method's latest checkpoint, verified; None when there is none."""
        folder = durable.readable_folder(self.out / "checkpoints" / spec["slug"])
        if not folder.is_dir():
            return None
        try:
            if not durable.verify(folder):
                warnings.warn(
                    f"{folder} has no {durable.MANIFEST} (written by an older keeplora): its integrity "
                    "cannot be verified",
                    durable.UnverifiedWarning,
                    stacklevel=2,
                )
            if not (folder / "state.pt").is_file():
                raise durable.IntegrityError(f"{folder / 'state.pt'} is missing")
            try:
                saved = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
            except Exception as error:  # noqa: BLE001 - unpickling a damaged file raises many kinds of errors
                raise durable.IntegrityError(
                    f"{folder / 'state.pt'} cannot be read: {type(error).__name__}: {error}"
                ) from None
            if not isinstance(saved, dict) or not {"state", "tensors", "extra", "info"} <= set(saved):
                raise durable.IntegrityError(f"{folder / 'state.pt'} does not hold a checkpoint")
        except durable.IntegrityError as error:
            raise self._damaged(spec, folder, error) from error
        return folder, saved

    def load_checkpoint(self, method: Method, found: tuple[Path, dict]) -> dict:
        """Restore a checkpoint read by :meth:`read_checkpoint` into a fresh method; returns its run state."""
        folder, saved = found
        try:
            method.load_extra_state(saved["extra"], folder)  # first: it may attach the adapters the tensors fill
        except durable.IntegrityError as error:
            raise self._damaged(method.spec, folder, error) from error
        missing_keys = set(saved["tensors"]) - set(method.model.state_dict())
        if missing_keys:
            raise CheckpointError(f"checkpoint {folder} does not fit the model: {sorted(missing_keys)[:5]} ...")
        method.model.load_state_dict(saved["tensors"], strict=False)
        method.info = saved["info"]
        return saved["state"]

    # ------------------------------------------------------------------ one method
    def run_method(self, spec: dict, zero: dict[str, list[float]], zero_seconds: float, outer) -> dict:
        """``{"rows", "val_rows", "panel_rows", "seconds", "info"}``: each view's accuracies after every task."""
        T = len(self.tasks)
        if spec["type"] == "zero_shot":
            outer.update(T)
            return {
                **{f"{key}rows": [list(zero[v]) for _ in range(T)] for v, key in _VIEW_KEYS.items() if v in zero},
                "seconds": zero_seconds,
                "info": [],
            }
        found = self.read_checkpoint(spec)
        if found is not None and found[1]["state"]["tasks_done"] == T:
            saved = found[1]
            outer.update(T)
            return {**saved["state"], "info": saved["info"]}
        enc = self._fresh_encoder()
        pristine = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
        method = build_method(spec, enc, self.seed)
        state = {"tasks_done": 0, "seconds": 0.0, **{f"{_VIEW_KEYS[v]}rows": [] for v in self.views}}
        if found is not None:
            state = self.load_checkpoint(method, found)
        outer.update(state["tasks_done"])
        for t in range(state["tasks_done"], T):
            outer.set_description(f"{spec['name']} · task {t + 1}/{T} {self.names[t]}")
            t0 = time.perf_counter()
            log = self.train_task(method, t)
            rows = self.evaluate(method)
            seconds = time.perf_counter() - t0
            state = dict(state, tasks_done=t + 1, seconds=state["seconds"] + seconds)
            for view, accs in rows.items():
                key = f"{_VIEW_KEYS[view]}rows"
                state[key] = state.get(key, []) + [accs]
            with open(self.out / "log.jsonl", "a") as f:  # before the checkpoint: a task logged twice = recomputed
                f.write(
                    json.dumps(
                        {
                            "method": spec["name"],
                            "task": self.names[t],
                            "seconds": round(seconds, 2),
                            **log,
                            **({"accuracy": rows["test"]} if "test" in rows else {}),
                            **({"val_accuracy": rows["val"]} if "val" in rows else {}),
                            **({"panel_accuracy": rows["panel"]} if "panel" in rows else {}),
                            **(method.info[-1] if method.info else {}),
                        }
                    )
                    + "\n"
                )
            self.save_checkpoint(method, pristine, state)
            outer.update(1)
        return {**state, "info": method.info}

    # ------------------------------------------------------------------ everything
    def run(self) -> RunResult:
        T = len(self.tasks)
        methods = self.cfg["methods"]
        result = RunResult(self.out, self.names, probes=[t.name for t in self.probes])
        t0 = time.perf_counter()
        zero, zero_seconds = self.zero_shot_row()
        result.zero_shot = zero.get("test", [])
        result.zero_shot_val = zero.get("val", [])
        result.zero_shot_panel = zero.get("panel", [])
        for view, accs in zero.items():
            names = result.probes if view == "panel" else self.names
            self.log(f"[keeplora] zero-shot {view}: " + ", ".join(f"{n} {a * 100:.1f}" for n, a in zip(names, accs)))
        outer = self._bar(T * len(methods), "methods x tasks")
        for spec in methods:
            out = self.run_method(spec, zero, zero_seconds, outer)
            name = spec["name"]
            metrics = {}
            if out.get("panel_rows"):  # the panel is evaluated only with the test splits
                result.panel_rows[name] = np.array([result.zero_shot_panel] + out["panel_rows"])
            if out.get("rows"):
                result.matrices[name] = np.array(out["rows"])
                metrics.update(M.summarize(result.matrices[name], result.zero_shot, result.panel_rows.get(name)))
            if out.get("val_rows"):
                result.val_matrices[name] = np.array(out["val_rows"])
                val = M.summarize(result.val_matrices[name], result.zero_shot_val)
                metrics.update({f"val_{k}": v for k, v in val.items()})
            result.metrics[name] = metrics
            result.wall_s[name] = float(out["seconds"])
            write_method_outputs(self.out, spec, result, out["info"])
            write_summary(self.out, self.cfg, result)
        outer.close()
        gate = write_summary(self.out, self.cfg, result, plots=True)
        if gate is not None:
            self.log(f"[keeplora] {gate['text']}")
        self.log(f"[keeplora] done in {time.perf_counter() - t0:.0f} s -> {self.out}")
        return result


_VIEW_KEYS = {"test": "", "val": "val_", "panel": "panel_"}  # view -> prefix of its rows in a method's state


# ---------------------------------------------------------------------- outputs
METRIC_COLUMNS = [  # (key, header) in the order of results.{md,csv}; a column appears when some method has it
    ("transfer", "Transfer"),
    ("average", "Average"),
    ("last", "Last"),
    ("bwt", "BWT"),
    ("fwt", "FWT"),
    ("retention", "Retention"),
    ("val_transfer", "val Transfer"),
    ("val_average", "val Average"),
    ("val_last", "val Last"),
    ("val_bwt", "val BWT"),
    ("val_fwt", "val FWT"),
]


def write_method_outputs(out: Path, spec: dict, result: RunResult, info: list) -> None:
    name, tasks = spec["name"], result.tasks
    folder = out / "methods" / spec["slug"]
    folder.mkdir(parents=True, exist_ok=True)
    acc = result.matrices.get(name)
    if acc is not None:
        with open(folder / "accuracy.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["after \\ on"] + tasks)
            for j, row in enumerate(acc):
                w.writerow([tasks[j]] + [f"{100 * a:.2f}" for a in row])
    record = {
        "method": name,
        "spec": spec,
        "tasks": tasks,
        "accuracy": None if acc is None else acc.tolist(),
        "metrics": result.metrics[name],
        "seconds": result.wall_s[name],
        "info": info,
    }
    if name in result.val_matrices:
        record["val_accuracy"] = result.val_matrices[name].tolist()
    if name in result.panel_rows:
        record.update(probes=result.probes, panel_accuracy=result.panel_rows[name].tolist())
    _dump_json(folder / "accuracy.json", record)
    if acc is None:
        return
    try:
        from .plots import heatmap

        heatmap(acc, tasks, f"{name}: accuracy (%) after each task", folder / "heatmap.png")
    except ImportError:
        pass


def drift_gate(cfg: dict, result: RunResult) -> dict | None:
    """Whether this run can judge protection (module docstring); None when it has no panel or no test matrices."""
    if not result.panel_rows or not result.matrices:
        return None
    kinds = {m["name"]: m["type"] for m in cfg["methods"]}
    return M.judge_drift(kinds, result.metrics, float(np.mean(result.zero_shot_panel)) * 100.0)


def write_summary(out: Path, cfg: dict, result: RunResult, plots: bool = False) -> dict | None:
    """results.{json,csv,md} (and the run's plots); returns the drift gate (:func:`drift_gate`)."""
    rows = [{"method": name, **result.metrics[name], "seconds": result.wall_s[name]} for name in result.metrics]
    columns = [(k, h) for k, h in METRIC_COLUMNS if any(k in r for r in rows)]
    gate = drift_gate(cfg, result)
    summary = {
        "config": cfg["name"],
        "quick": cfg.get("quick", False),
        "tasks": result.tasks,
        "zero_shot": result.zero_shot,
        "methods": rows,
        "matrices": {k: v.tolist() for k, v in result.matrices.items()},
    }
    if result.val_matrices:
        summary.update(
            zero_shot_val=result.zero_shot_val, val_matrices={k: v.tolist() for k, v in result.val_matrices.items()}
        )
    if result.panel_rows:
        summary.update(
            probes=result.probes,
            zero_shot_panel=result.zero_shot_panel,
            panel_curves={k: M.panel_curve(v) for k, v in result.panel_rows.items()},
            panel_accuracy={k: v.tolist() for k, v in result.panel_rows.items()},
        )
    if gate is not None:
        summary["drift_gate"] = gate
    _dump_json(out / "results.json", summary)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method"] + [k for k, _ in columns] + ["seconds"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = M.markdown_table(
        [dict(r, seconds=f"{r['seconds']:.0f}") for r in rows],
        [("method", "method"), *columns, ("seconds", "wall s")],
    )
    text = f"# {cfg['name']}{' (quick)' if cfg.get('quick') else ''}\n\nTasks in order: {', '.join(result.tasks)}\n\n"
    if result.probes:
        text += f"Held-out panel (never trained): {', '.join(result.probes)}\n\n"
    text += f"{table}\n"
    if gate is not None:
        text += f"\n{gate['text'][0].upper()}{gate['text'][1:]}.\n"
    (out / "results.md").write_text(text)
    if plots:
        try:
            from .plots import accuracy_over_steps, retention_over_steps

            if result.matrices:
                accuracy_over_steps(result.matrices, result.zero_shot, result.tasks, out / "accuracy_over_steps.png")
            if result.panel_rows:
                retention_over_steps(
                    {k: M.panel_curve(v) for k, v in result.panel_rows.items()}, result.tasks, out / "retention.png"
                )
        except ImportError:
            pass
    return gate


def run(
    config: str | Path | dict,
    output: str | Path | None = None,
    quick: bool = False,
    resume: bool = False,
    methods: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Run (or resume) a config; see the module docstring. ``methods`` keeps only the named methods."""
    source = None
    if isinstance(config, dict):
        cfg = config
    else:
        source = Path(config)
        cfg = load_config(source, quick=quick)
    if methods:
        known = [m["name"] for m in cfg["methods"]]
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ConfigError(f"--methods: unknown {unknown}; the config has {known}")
        cfg = dict(cfg, methods=[m for m in cfg["methods"] if m["name"] in methods])
    skipped = [m["name"] for m in cfg["methods"] if m["type"] == "osf"]
    if skipped and osf_missing():  # OSF comes from PEFT: without it those methods are skipped, the others run
        log(f"[keeplora] skipping {skipped}: {osf_missing()}")
        cfg = dict(cfg, methods=[m for m in cfg["methods"] if m["type"] != "osf"])
    for m in cfg["methods"]:
        if m["type"] == "keeplora":
            try:
                from keeplora import KeepLoRA  # noqa: F401
            except ImportError:
                raise RuntimeError(
                    f"method {m['name']!r} needs the KeepLoRA engine (keeplora.KeepLoRA), which this "
                    f"installation lacks; run the other methods with --methods"
                ) from None
    out = prepare_output(cfg, Path(output) if output else None, resume, source)
    return Runner(cfg, out, progress=progress, log=log).run()
