"""The ``keeplora`` command's small subcommands (run/sweep/data/bench/profile are tested with their modules)."""

from keeplora.cli import main


def test_info_prints_versions_extension_and_the_backend_of_every_op(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("keeplora ") and "compiled extension:" in out and "CUDA available:" in out
    assert "backends on cpu (KEEPLORA_BACKEND=" in out
    for op in ("lora_linear", "residual_project", "second_moment_update", "rsvd"):
        assert f"  {op} " in out
