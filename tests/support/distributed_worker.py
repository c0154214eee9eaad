"""One rank of a distributed KeepLoRA run, for tests/engine/test_distributed.py (launched by torchrun or accelerate).

    python -m torch.distributed.run --nproc_per_node 2 tests/support/distributed_worker.py SCENARIO OUT_DIR
    accelerate launch --multi_gpu --num_processes 2 tests/support/distributed_worker.py SCENARIO OUT_DIR

Scenarios: ``ddp``, ``fsdp`` (FSDP2 ``fully_shard``), ``accelerate`` (DDP by ``Accelerator.prepare``): two tasks
of :func:`continual_run` over this rank's shard of the data, on the tiny model named by ``KEEPLORA_TEST_CASE``
(``bert`` when unset; ``gpt2`` for Conv1D targets); ``trainer``: two tasks through ``transformers.Trainer``
with ``KeepLoRACallback``; ``collectives``: the helpers of keeplora.distributed on small tensors; ``fail`` /
``fail-fsdp``: rank 1's loss raises during the gradient pass. Each rank writes
``OUT_DIR/rank{r}.pt`` (tensors) and ``OUT_DIR/rank{r}.json`` (outcome). :func:`continual_run` is also the
single-process reference (all shards in one process).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from pathlib import Path

import torch

from keeplora import KeepLoRA, KeepLoRAConfig
from keeplora import distributed as kd
from support import tiny_models
from support.tiny_models import CASES, CONV1D_CASES

CASE = {**CASES, **CONV1D_CASES}[os.environ.get("KEEPLORA_TEST_CASE", "bert")]
WORLD = 2
BATCHES_PER_RANK = 2
LR = 0.5
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("KEEPLORA_TEST_PG_TIMEOUT", "20")))
# The equivalence runs use fp64 (model and statistics): ranks change only the order of the sums, and fp64 keeps that
# rounding far below the fp32 tolerance even through SVDs of nearly equal singular values.
DTYPE = getattr(torch, os.environ.get("KEEPLORA_TEST_DTYPE", "float64"))


def config() -> KeepLoRAConfig:
    return KeepLoRAConfig(
        target_modules=CASE.targets,
        r=4,
        alpha=8,
        feature_energy=0.9,
        progress=False,
        stats_dtype=str(DTYPE).removeprefix("torch."),
        grad_checkpoint=os.environ.get("KEEPLORA_TEST_GRAD_CHECKPOINT") == "1",
    )


def build_model() -> torch.nn.Module:
    return CASE.model().to(DTYPE)


def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The case's loss in the run's dtype (BERT: a fixed head on the first token)."""
    if CASE.name != "bert":
        return CASE.loss(model, batch)
    h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
    return torch.nn.functional.cross_entropy(h @ tiny_models._BERT_HEAD.to(h.dtype), batch["labels"])


def task_shards(task: int) -> list[list[dict]]:
    """The task's data split over WORLD ranks: shard r holds batches r, r + WORLD, …"""
    data = [
        {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in b.items()}
        for b in CASE.batches(n=WORLD * BATCHES_PER_RANK, seed=100 + task)
    ]
    return [data[r::WORLD] for r in range(WORLD)]


def snapshot(kl: KeepLoRA, prefix: str, record: dict, *, adapters: bool = True, gather: bool = True) -> None:
    """W, A, B (whole tensors, or this rank's shards with ``gather=False``) and P of every target."""
    read = kd.full_tensor if gather else kd.local_tensor
    for name, layer in kl.layers.items():
        record[f"{prefix}.{name}.W"] = read(layer.base_layer.weight.detach()).clone()
        if adapters:
            record[f"{prefix}.{name}.A"] = read(layer.lora_A[kl.adapter_name].weight.detach()).clone()
            record[f"{prefix}.{name}.B"] = read(layer.lora_B[kl.adapter_name].weight.detach()).clone()
        record[f"{prefix}.{name}.P"] = kl.bases[name].clone()


def continual_run(
    kl: KeepLoRA, train_model: torch.nn.Module, ranks: list[int], backward=None, out: Path | None = None
) -> dict:
    """Two tasks: begin_task, ``BATCHES_PER_RANK`` SGD steps, end_task, on the shards of ``ranks``.

    One step's loss is the mean over the held shards' batches of that step; under DDP/FSDP each process holds one
    shard and the wrapper averages gradients over the ranks, so both runs take the same steps. With ``out`` the
    second task's adapter is exported to ``out/adapter`` and the final state saved to ``out/state``.
    """
    record: dict = {}
    for task in range(2):
        shards = [task_shards(task)[r] for r in ranks]
        data = [b for shard in shards for b in shard]
        kl.begin_task(data, loss_fn)
        snapshot(kl, f"t{task}.begin", record)
        opt = torch.optim.SGD(kl.trainable_parameters(), lr=LR)
        for step in range(BATCHES_PER_RANK):
            loss = sum(loss_fn(train_model, shard[step]) for shard in shards) / len(shards)
            (backward or torch.Tensor.backward)(loss)
            opt.step()
            opt.zero_grad()
        snapshot(kl, f"t{task}.trained", record)
        export = out / "adapter" if out is not None and task == 1 else None
        kl.end_task(data, loss_fn, export_adapter_to=export)
        snapshot(kl, f"t{task}.end", record, adapters=False)
    if out is not None:
        kl.save(out / "state")
    return record


def _write(out: Path, rank: int, record: dict, outcome: dict) -> None:
    torch.save(record, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(outcome))


def _init() -> int:
    torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
    return torch.distributed.get_rank()


def scenario_ddp(out: Path) -> None:
    rank = _init()
    model = build_model()
    kl = KeepLoRA(model, config())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    record = continual_run(kl, ddp, [rank], out=out)
    _write(out, rank, record, {"history": kl.history})


def scenario_fsdp(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    rank = _init()
    model = build_model()
    kl = KeepLoRA(model, config())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.encoder.layer if hasattr(model, "encoder") else model.transformer.h:
        fully_shard(layer)
    fully_shard(model)
    sharded = {n: kd.is_sharded(layer.base_layer.weight) for n, layer in kl.layers.items()}
    record = continual_run(kl, model, [rank], out=out)
    _write(out, rank, record, {"history": kl.history, "full_bytes": full_bytes, "sharded": sharded})


def scenario_accelerate(out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT)])
    model = build_model()
    kl = KeepLoRA(model, config())
    wrapped = accelerator.prepare(model)
    record = continual_run(kl, wrapped, [accelerator.process_index], backward=accelerator.backward)
    _write(
        out,
        accelerator.process_index,
        record,
        {"history": kl.history, "wrapper": type(wrapped).__name__, "world": accelerator.num_processes},
    )


def scenario_trainer(out: Path) -> None:
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from keeplora import KeepLoRACallback

    case = CASES["llama"]

    class Rows(Dataset):
        def __init__(self, seed):
            self.rows = [
                {k: v[i] for k, v in b.items()}
                for b in case.batches(n=2, seed=seed)
                for i in range(b["input_ids"].shape[0])
            ]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    model = case.model()
    kl = KeepLoRA(model, KeepLoRAConfig(target_modules=case.targets, r=4, alpha=4, feature_energy=0.9, progress=False))
    record: dict = {}
    wrappers = []
    for task in range(2):
        snapshot(kl, f"t{task}.start", record, adapters=False)
        args = TrainingArguments(
            output_dir=str(out / f"trainer{task}"),
            per_device_train_batch_size=2,
            num_train_epochs=1,
            learning_rate=5e-2,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            remove_unused_columns=False,
            ddp_timeout=int(TIMEOUT.total_seconds()),
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Rows(task), callbacks=[KeepLoRACallback(kl)])
        trainer.train()
        wrappers.append(type(trainer.model_wrapped).__name__)
        snapshot(kl, f"t{task}.end", record, adapters=False)
    rank = torch.distributed.get_rank()
    _write(
        out,
        rank,
        record,
        {
            "history": kl.history,
            "tasks_done": kl.tasks_done,
            "wrappers": wrappers,
            "world": torch.distributed.get_world_size(),
        },
    )


def scenario_collectives(out: Path) -> None:
    """The helpers themselves, with tiny buckets so that every packing path runs."""
    rank = _init()
    record: dict = {}
    # all_reduce_sum: mixed dtypes, a non-contiguous tensor, buckets of one and of several tensors
    f32 = torch.full((3, 2), float(rank + 1))
    f64 = torch.arange(4, dtype=torch.float64) * (rank + 1)
    i64 = torch.tensor(rank + 5)
    wide = torch.ones(4, 3)[:, ::2] * (rank + 1)  # non-contiguous view
    kd.all_reduce_sum([f32, i64, f64, wide], bucket_bytes=24)
    record.update(sum_f32=f32, sum_f64=f64, sum_i64=i64, sum_wide=wide)
    # sync_from_rank0: rank-dependent shapes and values; a matching contiguous input receives in place
    same = torch.full((2, 2), float(rank))
    other = torch.full((2, 1 + rank), float(10 + rank))
    counts = torch.tensor([rank, rank], dtype=torch.int64)
    synced = kd.sync_from_rank0([same, other, counts], bucket_bytes=24)  # same + other share a buffer
    record.update(sync_same=synced[0], sync_other=synced[1], sync_counts=synced[2])
    outcome = {"in_place": synced[0] is same, "objects": kd.all_gather_objects({"rank": rank})}
    _write(out, rank, record, outcome)


def scenario_fail(out: Path, fsdp: bool = False) -> None:
    rank = _init()
    model = build_model()
    kl = KeepLoRA(model, config())
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    else:
        # kept referenced: a discarded wrapper is freed whenever the cyclic collector runs (see main)
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # noqa: F841
    before: dict = {}
    snapshot(kl, "before", before, gather=False)
    calls = []

    def failing_loss(m, batch):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise ValueError("rank 1 could not compute its loss")
        return loss_fn(m, batch)

    data = task_shards(0)[rank]
    outcome: dict = {}
    try:
        kl.begin_task(data, failing_loss)
        outcome["raised"] = None
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        outcome["raised"] = type(error).__name__
        outcome["message"] = str(error)
        outcome["notes"] = list(getattr(error, "__notes__", []))
    after: dict = {}
    snapshot(kl, "before", after, gather=False)
    outcome["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    outcome["in_task"] = kl.in_task
    if not fsdp:  # the status exchange kept the ranks in step: the next task still runs on both
        kl.begin_task(data, loss_fn)
        outcome["recovered"] = kl.in_task
        record = {}
        snapshot(kl, "recovered", record)
    else:
        record = {}
    _write(out, rank, record, outcome)
    if fsdp:  # a collective timed out: the default group is unusable, leave without tearing it down
        sys.stdout.flush()
        os._exit(0)


def main() -> None:
    torch.set_num_threads(1)
    scenario, out = sys.argv[1], Path(sys.argv[2])
    run = {
        "ddp": scenario_ddp,
        "fsdp": scenario_fsdp,
        "accelerate": scenario_accelerate,
        "trainer": scenario_trainer,
        "collectives": scenario_collectives,
        "fail": scenario_fail,
        "fail-fsdp": lambda o: scenario_fail(o, fsdp=True),
    }[scenario]
    run(out)
    # Free the DDP/FSDP wrappers (reference cycles: the cyclic collector frees them at an arbitrary later moment,
    # at worst during interpreter shutdown after the process group is gone: one CI run aborted there with
    # "terminate called without an active exception") while the group is alive and the ranks are in step.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down while its peer finishes the last collective (gloo abort)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
