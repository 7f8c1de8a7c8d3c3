"""The package as users install it: every subpackage and the recipes in the wheel, console
scripts that run, and the quick start trained from another directory out of a non-editable install."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from big_vision_lite import config as config_lib, recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
  PYPROJECT = tomllib.load(_f)
SCRIPTS = PYPROJECT["project"]["scripts"]
TINY = "res=16,width=16,depth=1,heads=2,patch=8,batch=16,workers=0"


def test_every_subpackage_and_the_recipes_are_packaged():
  found = {os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, ".")
           for p in glob.glob(os.path.join(ROOT, "big_vision_lite", "**", "__init__.py"), recursive=True)}
  setuptools = PYPROJECT["tool"]["setuptools"]
  assert set(setuptools["packages"]) == found | {"big_vision_lite.configs"}
  assert setuptools["package-dir"] == {"big_vision_lite.configs": "configs"}


def test_recipes_are_listed_and_found_by_name(tmp_path, monkeypatch):
  on_disk = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
  assert recipes.list_recipes() == on_disk
  assert recipes.list_recipes("vmoe_*") == ["vmoe_i1k", "vmoe_i21k", "vmoe_shapes"]
  assert recipes.summary("vit_shapes") == "ViT on bvl_shapes: the README's first training command."
  monkeypatch.chdir(tmp_path)  # a name, from a directory without configs/
  by_name = config_lib.load_config("vmoe_shapes:steps=7")  # which loads vit_shapes.py by path
  by_path = config_lib.load_config(os.path.join(ROOT, "configs", "vmoe_shapes.py:steps=7"))
  assert by_name.to_dict() == by_path.to_dict() and by_name.total_steps == 7


@pytest.mark.parametrize("spec,message", [
    ("vit_shaps", "--config: 'vit_shaps' is neither a file nor a shipped recipe; did you mean 'vit_shapes'? "
                  "(recipes: cappa_b16, "),
    ("configs/vit_shapes.py", "--config: file 'configs/vit_shapes.py' does not exist "
                              "(the shipped recipe of that name is --config vit_shapes)"),
    ("configs/nope.py", "--config: file 'configs/nope.py' does not exist"),
])
def test_a_missing_config_is_one_line(spec, message, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(spec)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _wheel(tmp_path) -> str:
  """Builds the wheel from a copy of the sources (a stale build/ in the tree cannot leak in)."""
  src = tmp_path / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
  for d in ("big_vision_lite", "configs"):
    shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
  for f in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, f), src / f)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                  "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tmp_path)
  (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
  return wheel


@pytest.mark.slow  # ~1-2 min: builds and installs the wheel, then 2 training steps compiled
def test_non_editable_install_trains_the_quick_start_from_another_directory(tmp_path):
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                  _wheel(tmp_path)], check=True, capture_output=True)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # Only the installed copy and the interpreter's own site-packages (the dependencies).
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}

  def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)

  where = run(sys.executable, "-c", "import big_vision_lite, sys; print(big_vision_lite.__file__)")
  assert where.stdout.strip() == str(target / "big_vision_lite" / "__init__.py"), where.stderr
  listed = run(str(target / "bin" / "bvl-train"), "--list-recipes")
  assert listed.returncode == 0, listed.stderr
  assert [line.split()[0] for line in listed.stdout.splitlines()] == recipes.list_recipes()
  for script in SCRIPTS:
    r = run(str(target / "bin" / script), "--help")
    assert r.returncode == 0 and "usage:" in r.stdout, f"{script} --help: {r.stderr[-2000:]}"
  workdir = elsewhere / "run"
  r = run(str(target / "bin" / "bvl-train"), "--config", f"vit_shapes:{TINY}", "--config.total_steps=2",
          "--config.schedule.warmup_steps=1", "--workdir", str(workdir))
  assert r.returncode == 0, r.stderr[-3000:]
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if '"loss"' in line]
  assert steps and steps[-1] == 2
