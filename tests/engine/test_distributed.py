"""KeepLoRA under torch.distributed: 2 CPU processes on gloo, launched by torchrun and by accelerate launch.

Each test runs tests/support/distributed_worker.py in 2 processes (OMP_NUM_THREADS=1, a free port, process-group
timeouts set, a hard wall-clock limit) and compares what the ranks wrote. The equivalence runs use fp64 (model and
statistics): splitting the data over ranks only changes the order of the sums, and in fp64 that rounding stays far
below the fp32 tolerance the results are held to, even through SVDs of nearly equal singular values.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keeplora import KeepLoRA
from keeplora import distributed as kd
from support import distributed_worker as worker
from support.tolerances import assert_close

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
]

WORKER = Path(worker.__file__)
LIMIT_S = 150  # hard limit of one 2-process launch (a hang fails the test instead of the suite)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    launcher: str, scenario: str, out: Path, pg_timeout_s: int = 30, case: str = "bert", env: dict | None = None
) -> dict:
    """Run the worker on 2 ranks (on the tiny model ``case``, with ``env`` added to the environment); return
    ``{rank: (tensors, outcome)}``."""
    extra_env = env or {}
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "KEEPLORA_TEST_PG_TIMEOUT": str(pg_timeout_s),
        "KEEPLORA_TEST_CASE": case,
        # the worker imports the test helpers as the package ``support`` (its folder's parent)
        "PYTHONPATH": os.pathsep.join(p for p in (str(WORKER.parents[1]), os.environ.get("PYTHONPATH")) if p),
        **extra_env,
    }
    proc = subprocess.Popen(
        [*cmd, str(WORKER), scenario, str(out)],
        cwd=WORKER.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{launcher} {scenario} did not finish in {LIMIT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"{launcher} {scenario} failed ({proc.returncode}):\n{log[-4000:]}"
    return {r: (torch.load(out / f"rank{r}.pt"), json.loads((out / f"rank{r}.json").read_text())) for r in (0, 1)}


@pytest.fixture(scope="module")
def reference() -> dict:
    """The one-process run over the whole data (both shards)."""
    return one_process_run()


def one_process_run() -> dict:
    """The worker's continual run in this process over the whole data (both shards), on ``worker.CASE``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = worker.build_model()
        kl = KeepLoRA(model, worker.config())
        record = worker.continual_run(kl, model, list(range(worker.WORLD)))
    finally:
        torch.set_num_threads(threads)
    # the run is not vacuous: weights moved, bases grew, adapters were non-zero
    name = next(iter(kl.layers))
    assert not torch.equal(record[f"t0.end.{name}.W"], record[f"t0.begin.{name}.W"])
    assert record[f"t1.end.{name}.P"].shape[1] > record[f"t0.begin.{name}.P"].shape[1]
    assert record[f"t1.trained.{name}.B"].abs().max() > 0
    return record


def assert_equals_reference(ranks: dict, reference: dict) -> None:
    (r0, _), (r1, _) = ranks[0], ranks[1]
    assert r0.keys() == r1.keys() == reference.keys()
    differing = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differing, f"ranks disagree on {differing[:5]}"
    for key, expected in reference.items():
        assert r0[key].shape == expected.shape, key
        assert_close(r0[key], expected, dtype=torch.float32)


def assert_saved_state_matches(out: Path, record: dict) -> None:
    """Rank 0 alone wrote the state and the second task's adapter; both hold the final tensors."""
    model = worker.build_model()
    loaded = KeepLoRA.load(out / "state", model)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for name, layer in loaded.layers.items():
        assert torch.equal(layer.base_layer.weight, record[f"t1.end.{name}.W"])
        assert torch.equal(loaded.bases[name], record[f"t1.end.{name}.P"])
        exported_b = adapter[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(exported_b, record[f"t1.trained.{name}.B"] - record[f"t1.begin.{name}.B"])
    assert not any(p.name.startswith(".") for p in out.iterdir()), "a temporary folder was left behind"


def test_ddp_two_ranks_equal_one_rank(tmp_path, reference):
    ranks = launch("torchrun", "ddp", tmp_path)
    assert_equals_reference(ranks, reference)
    assert_saved_state_matches(tmp_path, ranks[0][0])
    history = ranks[0][1]["history"]
    assert [m["rank"] for m in history[-1]["memory"]] == [0, 1]


def test_fsdp2_two_ranks_equal_one_rank(tmp_path, reference):
    ranks = launch("torchrun", "fsdp", tmp_path)
    outcome = ranks[0][1]
    assert all(outcome["sharded"].values())  # the targets really were DTensors during the run
    assert_equals_reference(ranks, reference)
    assert_saved_state_matches(tmp_path, ranks[0][0])
    memory = outcome["history"][-1]["memory"]
    assert [m["rank"] for m in memory] == [0, 1]
    assert all(m["parameter_bytes"] < 0.75 * outcome["full_bytes"] for m in memory), memory


def test_fsdp2_with_a_checkpointed_gradient_pass_equals_one_rank(tmp_path, reference):
    """grad_checkpoint under FSDP2: the checkpointed blocks are the sharded ones; the run equals the one-process run
    without checkpointing."""
    ranks = launch("torchrun", "fsdp", tmp_path, env={"KEEPLORA_TEST_GRAD_CHECKPOINT": "1"})
    assert all(ranks[0][1]["sharded"].values())
    assert_equals_reference(ranks, reference)


def test_fsdp2_two_ranks_equal_one_rank_with_conv1d_targets(tmp_path, monkeypatch):
    """GPT-2 (transformers Conv1D targets, weight stored d_in × d_out): the merges write the FSDP2 shards of the
    stored weight through its transposed view. The ranks agree exactly, and with one process up to rounding: the
    adapter directions' signs too, although an SVD of a residual gradient whose input differs by rounding may return
    either (the engine fixes them)."""
    monkeypatch.setattr(worker, "CASE", worker.CONV1D_CASES["gpt2"])
    reference = one_process_run()
    ranks = launch("torchrun", "fsdp", tmp_path, case="gpt2")
    outcome = ranks[0][1]
    assert all(outcome["sharded"].values())
    assert_equals_reference(ranks, reference)
    assert_saved_state_matches(tmp_path, ranks[0][0])


def test_accelerate_launch_plain_loop_equals_one_rank(tmp_path, reference):
    pytest.importorskip("accelerate")
    ranks = launch("accelerate", "accelerate", tmp_path)
    assert ranks[0][1]["wrapper"] == "DistributedDataParallel" and ranks[0][1]["world"] == 2
    assert_equals_reference(ranks, reference)


def test_trainer_callback_under_accelerate_launch(tmp_path):
    pytest.importorskip("accelerate")
    ranks = launch("accelerate", "trainer", tmp_path)
    (r0, o0), (r1, o1) = ranks[0], ranks[1]
    assert o0["world"] == 2 and o0["tasks_done"] == o1["tasks_done"] == 2
    assert set(o0["wrappers"]) == {"DistributedDataParallel"}
    differing = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differing, f"ranks disagree on {differing[:5]}"
    for task in range(2):
        names = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in r0 if k.startswith(f"t{task}.end.")}
        moved = 0
        for name in names:  # each task's change lies outside the basis it started with
            delta = (r0[f"t{task}.end.{name}.W"] - r0[f"t{task}.start.{name}.W"]).double()
            moved += bool(delta.abs().max() > 0)
            assert (delta @ r0[f"t{task}.start.{name}.P"].double()).abs().max() < 1e-5
        assert moved
    # the feature pass counted the real tokens of the whole task (both ranks' shards of the Trainer's data)
    case = worker.CASES["llama"]
    for task, record in enumerate(o0["history"]):
        real_tokens = sum(int(b["attention_mask"].sum()) for b in case.batches(n=2, seed=task))
        assert set(record["tokens"].values()) == {real_tokens}


def test_collective_helpers_sum_and_sync_across_ranks(tmp_path):
    ranks = launch("torchrun", "collectives", tmp_path)
    for r in (0, 1):
        got, outcome = ranks[r]
        assert torch.equal(got["sum_f32"], torch.full((3, 2), 3.0))
        assert torch.equal(got["sum_f64"], torch.arange(4, dtype=torch.float64) * 3)
        assert int(got["sum_i64"]) == 11
        assert torch.equal(got["sum_wide"], torch.full((4, 2), 3.0))
        assert torch.equal(got["sync_same"], torch.zeros(2, 2))
        assert torch.equal(got["sync_other"], torch.full((2, 1), 10.0))  # rank 0's shape and values
        assert torch.equal(got["sync_counts"], torch.zeros(2, dtype=torch.int64))
        assert outcome["in_place"]
        assert outcome["objects"] == [{"rank": 0}, {"rank": 1}]


def test_failing_rank_raises_on_every_rank_and_leaves_them_in_step(tmp_path):
    ranks = launch("torchrun", "fail", tmp_path)
    (_, o0), (_, o1) = ranks[0], ranks[1]
    assert o1["raised"] == "ValueError" and "rank 1 could not compute its loss" in o1["message"]
    assert any("rank 1 of 2" in note for note in o1["notes"])
    assert o0["raised"] == "RankFailedError"
    assert "rank 1" in o0["message"] and "could not compute its loss" in o0["message"]
    for outcome in (o0, o1):
        assert outcome["unchanged"] and not outcome["in_task"]
        assert outcome["recovered"]  # the next begin_task runs on both ranks: no collective was left pending
    differing = [k for k in ranks[0][0] if not torch.equal(ranks[0][0][k], ranks[1][0][k])]
    assert not differing


def test_failing_rank_under_fsdp2_raises_on_every_rank_after_the_timeout(tmp_path):
    # Rank 0 waits in an FSDP all-gather that rank 1 never joins; the group's timeout (5 s) ends it, and the status
    # exchange (on its own group, twice that timeout) still finds rank 1 waiting: both raise with both errors.
    ranks = launch("torchrun", "fail-fsdp", tmp_path, pg_timeout_s=5)
    for r in (0, 1):
        outcome = ranks[r][1]
        assert outcome["raised"] == "RankFailedError", outcome
        assert "rank 1: ValueError: rank 1 could not compute its loss" in outcome["message"]
        assert outcome["unchanged"] and not outcome["in_task"]


# ----------------------------------------------------------------------------------------------- one process
@pytest.fixture
def one_rank_group():
    """A 1-process gloo group, so that DDP and fully_shard can be built inside the test process."""
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_model_wrapped_before_keeplora_is_refused_untouched(one_rank_group):
    model = worker.build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="construct KeepLoRA on the bare model first"):
        KeepLoRA(ddp, worker.config())
    from torch.distributed.fsdp import fully_shard

    sharded = worker.build_model()
    fully_shard(sharded)
    with pytest.raises(ValueError, match="apply fully_shard"):
        KeepLoRA(sharded, worker.config())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_wrapped_model_with_its_adapter_is_unwrapped(one_rank_group, tmp_path):
    model = worker.build_model()
    kl = KeepLoRA(model, worker.config())
    kl.save(tmp_path / "state")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loaded = KeepLoRA.load(tmp_path / "state", ddp)
    assert loaded.model is model
    data = worker.task_shards(0)[0]
    loaded.begin_task(data, worker.loss_fn)
    loss = worker.loss_fn(ddp, data[0])  # the wrapper trains the adapter KeepLoRA initialised
    loss.backward()
    assert all(p.grad is not None for p in loaded.trainable_parameters())


def test_collectives_are_identities_in_one_process():
    t = torch.arange(6.0).reshape(2, 3)
    kd.all_reduce_sum([t])
    assert torch.equal(t, torch.arange(6.0).reshape(2, 3))
    assert kd.sync_from_rank0([t])[0] is t
    assert kd.all_gather_objects({"a": 1}) == [{"a": 1}]
    with pytest.raises(KeyError):  # errors pass through unchanged
        with kd.failures_shared("step"):
            raise KeyError("x")


def test_buckets_pack_by_dtype_and_size():
    a, b, c = torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.int64)
    buckets = list(kd._buckets([a, c, b], limit=16))
    assert [[id(t) for t in bucket] for bucket in buckets] == [[id(a)], [id(b)], [id(c)]]
    assert [[id(t) for t in bucket] for bucket in kd._buckets([a, b], limit=32)] == [[id(a), id(b)]]
