"""The KeepLoRA benchmark app, installed beside the library (``keeplora``) and its ops (``keeplora_kernels``).

* ``continual``: the embedded continual benchmark (data sources, tasks, model, methods, runner, sweep, metrics,
  plots) behind ``keeplora run``, ``sweep``, ``aggregate`` and ``data``;
* ``baselines``: the authors' research pipeline, re-implemented as the baseline the profiles run beside KeepLoRA;
* ``micro``: the harness (timing, peak memory, result rows), kernel and SVD microbenchmarks (``keeplora bench``),
  the lifecycle profile (``keeplora profile``) and other measurements; results go to ``benchmarks/results/``;
* ``gpu_check``: the one GPU script (``bash benchmarks/gpu_check.sh``);
* ``targets``: the open performance targets and A/B decisions, judged from a GPU run's CSVs;
* ``cli``: the app's subcommands, which ``keeplora.cli`` hands over.

The library never imports this package.
"""
