"""The house as a user and a neighbour meet it: an installed wheel, another Hydra app, --help."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import dreamjax

REPO = Path(__file__).resolve().parents[1]


def test_foreign_hydra_app_does_not_import_jax_or_touch_xla_flags(tmp_path):
    """Hydra imports every hydra_plugins module at start-up: ours must not import jax (or dreamjax)
    nor change XLA_FLAGS in someone else's Hydra application."""
    app = tmp_path / "foreign_app.py"
    app.write_text(
        "import os, sys\n"
        "import hydra\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.launcher import Launcher\n"
        "@hydra.main(version_base='1.3', config_path=None)\n"
        "def main(cfg):\n"
        "    names = [p.__name__ for p in Plugins.instance().discover(Launcher)]\n"
        "    print('launchers', ' '.join(sorted(names)))\n"
        "    print('jax', 'jax' in sys.modules, 'dreamjax', any(m.startswith('dreamjax') for m in sys.modules))\n"
        "    print('XLA_FLAGS', repr(os.environ.get('XLA_FLAGS')))\n"
        "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_foreign_marker=1"
    out = subprocess.run([sys.executable, str(app), f"hydra.run.dir={tmp_path / 'out'}"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    ours = [n for n in lines["launchers"].split() if n.startswith(("Dreamjax", "_"))]
    assert ours == ["DreamjaxLauncher", "DreamjaxSlurmLauncher"], lines  # discovery saw our plugin...
    assert lines["jax"] == "False dreamjax False"  # ...without importing jax or dreamjax
    assert lines["XLA_FLAGS"] == repr("--xla_foreign_marker=1")


def test_help_names_the_app_and_every_experiment():
    out = subprocess.run([sys.executable, "-m", "dreamjax.cli", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("dreamjax: ") and "powered by Hydra" not in out.stdout
    for f in (Path(dreamjax.config_dir()) / "experiment").glob("*.yaml"):
        line = next(x for x in out.stdout.splitlines() if x.strip().startswith(f.stem + " "))
        assert len(line.split(None, 1)[1]) > 10, line  # a one-line summary, not just the name


def _venv_with_wheel(tmp_path: Path) -> Path:
    """A fresh venv outside the clone with dreamjax's wheel installed (its dependencies are taken
    from this environment's site-packages through a .pth file, so no download is needed)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies from here, but never this checkout's dreamjax (an editable install's finder).
    here = sysconfig.get_paths()["purelib"]
    (Path(site) / "deps_from_parent.pth").write_text(here + "\n")
    whl = next(wheels.glob("dreamjax-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(whl)],
                   check=True, timeout=600)
    return py


@pytest.mark.slow
def test_wheel_installed_elsewhere_composes_every_experiment_and_dreams(tmp_path):
    py = _venv_with_wheel(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONNOUSERSITE"] = "1"
    where = subprocess.run([str(py), "-c", "import dreamjax; print(dreamjax.__file__); print(dreamjax.config_dir())"],
                           capture_output=True, text=True, cwd=work, env=env, check=True).stdout.split()
    assert not where[0].startswith(str(REPO)) and not where[1].startswith(str(REPO)), where
    dj = [str(py), "-m", "dreamjax.cli"]
    for exp in sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")):
        out = subprocess.run([*dj, f"+experiment={exp}", "--cfg", "job"], capture_output=True, text=True,
                             cwd=work, env=env, timeout=300)
        assert out.returncode == 0, (exp, out.stderr[-2000:])
        assert "model:" in out.stdout and "layers:" in out.stdout
    out = subprocess.run([*dj, "+experiment=quickstart", "model=tiny", "layers=tiny_default", "data.image_size=96",
                          "dream.iterations=2",
                          "dream.num_octaves=1", "analyze=false", "name=wheel"], capture_output=True, text=True,
                         cwd=work, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((work / "outputs" / "wheel").rglob("dream.png"))) == 3


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path):
    """The README's Python API block, run as written in a fresh interpreter."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "api.py"
    script.write_text(block + "\nassert dreams.shape == (2, 224, 176, 3) and dreams.dtype.name == 'uint8'\n"
                      "assert len(top5) == 5 and set(feats) == {'block9'}\nprint('ok')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
