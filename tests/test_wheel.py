"""harness as a wheel: built from the checkout and installed into a fresh venv outside it, it renders the
leaderboard with the templates it ships (nothing read from the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "results-0.1.0.db"


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _site_dirs(python: str | Path, cwd: Path) -> list[str]:
    code = ("import json, sysconfig; "
            "print(json.dumps(sorted({sysconfig.get_path(p) for p in ('purelib', 'platlib')})))")
    return json.loads(_run(python, "-c", code, cwd=cwd))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's bin folder, the wheel, a temp cwd outside the checkout, the environment)."""
    pytest.importorskip("setuptools", reason="building a wheel without build isolation needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # build/ and *.egg-info go to tmp, not into the checkout (where a stale build/lib would leak in)
    (tmp / "build.cfg").write_text(f"[build]\nbuild_base = {tmp / 'build'}\n[egg_info]\negg_base = {tmp}\n")
    build_env = dict(env, DIST_EXTRA_CONFIG=str(tmp / "build.cfg"))
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
         ROOT, cwd=tmp, env=build_env)
    [wheel] = (tmp / "dist").glob("harness-*.whl")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    # dependencies (and pip) from this interpreter's site-packages; paths a .pth adds are not scanned for
    # .pth files, so the checkout's editable install is not active there
    [fresh] = _site_dirs(python, tmp)
    here = "\n".join(_site_dirs(sys.executable, tmp))
    Path(fresh, "_harness_test_deps.pth").write_text(here + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel,
         cwd=tmp, env=env)
    return venv / "bin", wheel, tmp, env


def test_wheel_ships_every_package_and_the_templates(installed):
    _, wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent.relative_to(ROOT).as_posix() for top in ("harness", "defenses")
                for p in (ROOT / top).rglob("__init__.py")]
    assert [p for p in packages if f"{p}/__init__.py" not in names] == []
    shipped = {t.name for t in (ROOT / "templates").glob("*.j2")}
    assert shipped and all(f"harness/templates/{t}" in names for t in shipped)
    assert "harness/py.typed" in names


def test_installed_wheel_renders_the_leaderboard(installed):
    bin_dir, _, tmp, env = installed
    where = json.loads(_run(bin_dir / "python", "-c", "import json, harness, harness.templates; "
                            "print(json.dumps([harness.__file__, harness.templates.__file__]))", cwd=tmp, env=env))
    assert all(not Path(p).resolve().is_relative_to(ROOT) for p in where), where
    db = tmp / "results.db"
    shutil.copy(FIXTURE, db)
    _run(bin_dir / "harness", "report", "--db", db, "--out", tmp / "out", "--format", "html", cwd=tmp, env=env)
    html = (tmp / "out" / "index.html").read_text()
    assert "harness leaderboard" in html and "<style>" in html
    assert "diffpure" in html and "Diffusion Models for Adversarial Purification" in html
