"""Fixtures shared by the benchmark app's tests."""

import pytest

from support.app_fixtures import make_bench_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A fake data cache (``cache/``) and a tiny BERT (``bert/``), built once per test module."""
    return make_bench_world(tmp_path_factory.mktemp("bench"))
