"""The library and its ops import no benchmark, data, plotting or app code (the app lives in benchmarks/)."""

import json
import subprocess
import sys

# imported in a fresh interpreter: the test session itself has the app and matplotlib loaded
SCRIPT = """
import json, sys
import keeplora, keeplora.trainer, keeplora.distributed, keeplora.cli, keeplora_kernels
keeplora.cli.build_parser()  # `keeplora --help` lists the app's subcommands without importing the app
print(json.dumps(sorted(sys.modules)))
"""
APP_PREFIXES = ("keeplora_bench", "matplotlib", "rdata")


def test_library_imports_no_app_data_or_plotting_module():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "keeplora.trainer" in modules and "keeplora_kernels" in modules  # the imports above did happen
    loaded = [m for m in modules if m.split(".")[0] in APP_PREFIXES]
    assert not loaded, loaded
