"""The package's import graph points one way (tools/import_graph.py), and no module of the package
holds a test hook: faults come from tests/fault_entry.py only."""

import os
import subprocess
import sys

from big_vision_lite.tools import import_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_package_graph_points_one_way():
  r = subprocess.run([sys.executable, "-m", "big_vision_lite.tools.import_graph", "--edges"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 0, r.stderr
  edges = set(r.stdout.splitlines())
  assert {"train -> run", "run -> loop", "loop -> hooks.base", "run -> hooks.checkpoint"} <= edges
  assert "arrows one way" in r.stdout


def test_a_backward_arrow_is_reported():
  bad = import_graph.violations({"loop": {"train"}, "hooks.metrics": {"run"},
                                 "tasks.classification": {"loop"}, "models.vit": {"hooks.base"},
                                 "plan": {"run"}, "train": {"run"}})
  assert [b.split(":")[0] for b in bad] == [
      "hooks.metrics -> run", "loop -> train", "models.vit -> hooks.base", "plan -> run",
      "tasks.classification -> loop"]


def test_relative_and_from_imports_count(tmp_path):
  assert "big_vision_lite.hooks.base" in import_graph._imports(  # pylint: disable=protected-access
      os.path.join(ROOT, "big_vision_lite", "loop.py"), "big_vision_lite.loop")


def test_no_fault_hook_in_the_package():
  for dirpath, _, names in os.walk(os.path.join(ROOT, "big_vision_lite")):
    for n in names:
      if n.endswith(".py"):
        text = open(os.path.join(dirpath, n), encoding="utf-8").read()
        assert "BVL_FAULT" not in text and "_inject_fault" not in text, n
