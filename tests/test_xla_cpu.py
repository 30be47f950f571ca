"""dreamjax.engine.xla_cpu: which XLA:CPU flags configure_cpu() adds, and when it must not."""
import os
import subprocess
import sys

import pytest

from dreamjax.engine import xla_cpu


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: xla_cpu.CHECKED_JAXLIB[0])


def test_adds_the_xnnpack_flags_on_checked_versions(fresh):
    env = {}
    assert xla_cpu.configure(env) == xla_cpu.XNNPACK_FLAGS
    assert env["XLA_FLAGS"].split() == list(xla_cpu.XNNPACK_FLAGS)


def test_keeps_the_users_flags_and_never_overrides_one(fresh):
    mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT --xla_dump_to=/tmp/x"
    env = {"XLA_FLAGS": mine}
    added = xla_cpu.configure(env)
    assert [f.split("=")[0] for f in added] == ["--xla_cpu_experimental_xnn_fusion_type"]
    assert env["XLA_FLAGS"].startswith(mine)


@pytest.mark.parametrize("choice", ["default", "off"])
def test_opt_out(fresh, choice):
    env = {xla_cpu.ENV: choice}
    assert xla_cpu.configure(env) == () and "XLA_FLAGS" not in env


def test_unknown_choice_is_a_clear_error(fresh):
    with pytest.raises(ValueError, match="DREAMJAX_XLA_CPU_CONV.*xnnpack.*default"):
        xla_cpu.configure({xla_cpu.ENV: "fast"})


def test_other_jaxlib_versions_get_nothing_unless_asked(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (9, 0))
    assert xla_cpu.configure({}) == ()  # an unknown flag would abort XLA
    assert xla_cpu.configure({xla_cpu.ENV: "xnnpack"}) == xla_cpu.XNNPACK_FLAGS


def test_started_backend_is_left_alone(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: True)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: xla_cpu.CHECKED_JAXLIB[0])
    env = {}
    assert xla_cpu.configure(env) == () and "XLA_FLAGS" not in env


def test_importing_dreamjax_changes_nothing_and_configure_cpu_sets_the_flags():
    """In a fresh interpreter, importing every dreamjax module leaves XLA_FLAGS alone (a library
    must not change another's settings); ``dreamjax.configure_cpu()`` then sets what configure()
    decides, and XLA accepts the flags (an unknown flag would abort the process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.ENV)}
    code = ("import os, dreamjax, dreamjax.sweep.jobs, dreamjax.sweep.slurm, dreamjax.cli; "
            "print(repr(os.environ.get('XLA_FLAGS'))); dreamjax.configure_cpu(); "
            "import jax.numpy as jnp; from dreamjax.engine import xla_cpu; "
            "print(jnp.ones(3).sum()); print(repr(xla_cpu.applied)); print(os.environ.get('XLA_FLAGS', ''))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "None"
    assert lines[1] == "3.0"
    if xla_cpu.CHECKED_JAXLIB[0] <= xla_cpu._jaxlib_version() < xla_cpu.CHECKED_JAXLIB[1]:
        assert all(f in lines[3] for f in xla_cpu.XNNPACK_FLAGS)
