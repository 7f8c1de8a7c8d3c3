"""Registries find their components without prior imports; data sources are one of them."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from big_vision_lite import config as config_lib
from big_vision_lite.data import sources
from big_vision_lite.registry import Registry, UnknownNameError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_fresh_interpreter_lists_every_component():
  # Each registry module alone, in a new process: nothing imported the components before.
  code = textwrap.dedent("""
    import json
    from big_vision_lite.models import MODELS
    from big_vision_lite.tasks import TASKS
    from big_vision_lite.evaluators import EVALUATORS
    from big_vision_lite.data.ops import OPS
    from big_vision_lite.data.sources import SOURCES
    print(json.dumps({r.kind: r.names() for r in (MODELS, TASKS, EVALUATORS, OPS, SOURCES)}))
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
  names = json.loads(out.stdout.splitlines()[-1])
  assert {"vit", "vmoe", "two_towers", "cappa", "openvision2", "text"} <= set(names["model"])
  assert {"classification", "contrastive", "captioning"} <= set(names["task"])
  assert {"classification", "zero_shot", "retrieval", "linear_probe"} <= set(names["evaluator"])
  assert {"decode", "resize", "randaug", "tokenize", "shapes_caption"} <= set(names["preprocessing op"])
  assert names["data source"] == ["array_record", "bvl_shapes", "bvl_shapes_multi", "mixture", "tar"]


def _package(tmp_path, monkeypatch, files: dict[str, str]) -> str:
  pkg = tmp_path / "bvl_test_plugins"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  for name, body in files.items():
    (pkg / f"{name}.py").write_text(body)
  monkeypatch.syspath_prepend(str(tmp_path))
  for mod in [m for m in sys.modules if m.startswith("bvl_test_plugins")]:
    monkeypatch.delitem(sys.modules, mod)
  return pkg.name


def test_a_new_file_is_a_new_component(tmp_path, monkeypatch):
  reg = Registry("widget", "bvl_test_plugins", modules=("widgets_*",))
  monkeypatch.setattr(sys.modules[__name__], "REG", reg, raising=False)
  body = "import {mod} as t\n@t.REG.register({name!r})\ndef f(): return {name!r}\n"
  _package(tmp_path, monkeypatch, {
      "widgets_round": body.format(mod=__name__, name="round"),
      "widgets_square": body.format(mod=__name__, name="square"),
      "helpers": "raise AssertionError('a module outside the pattern was imported')\n",
  })
  assert "square" in reg  # a lookup discovers the files that match the pattern...
  assert reg.names() == ["round", "square"]  # ...and not helpers.py
  assert reg.get("round")() == "round"
  with pytest.raises(UnknownNameError, match=r"unknown widget 'sqare'; did you mean 'square'\?"):
    reg.get("sqare")


def test_an_import_error_inside_a_component_is_not_swallowed(tmp_path, monkeypatch):
  reg = Registry("widget", "bvl_test_plugins")
  _package(tmp_path, monkeypatch, {"broken": "import no_such_module_anywhere\n"})
  with pytest.raises(ModuleNotFoundError, match="no_such_module_anywhere"):
    reg.names()


def _data(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def test_sources_name_their_keys():
  assert sources.data_keys("array_record") == ("name", "split", "files")
  assert sources.data_keys("tar") == ("name", "split", "files")
  assert sources.data_keys("bvl_shapes/tiny") == ("name", "split", "data_dir")
  assert sources.data_keys("imagenet2012") == ("name", "split", "data_dir")  # any tfds name


@pytest.mark.parametrize("name,hint", [
    ("arrayrecord", "; did you mean data source 'array_record'?"),
    ("bvl_shape", "; did you mean data source 'bvl_shapes'?"),
    ("imagenet2012", ""),  # a tfds name: no hint
])
def test_a_near_miss_of_a_source_name_is_suggested(name, hint):
  with pytest.raises(config_lib.ConfigError) as e:
    sources.get_source(_data(name=name, split="train"))
  msg = str(e.value)
  assert msg.startswith("config.input.data.data_dir: not set, so tfds dataset") and "\n" not in msg
  assert msg.endswith(hint) if hint else "did you mean" not in msg


def test_a_file_source_without_files_is_refused():
  with pytest.raises(config_lib.ConfigError, match=r"config.input.data.files must be set when "
                     r"config.input.data.name is 'array_record'"):
    sources.get_source(_data(name="array_record", split="train"))


def test_an_unknown_source_is_one_line_and_exit_2():
  r = subprocess.run([sys.executable, "-m", "big_vision_lite.train", "--config", "configs/vit_shapes.py",
                      "--config.input.data.name=arrayrecord"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == ("error: config.input.data.data_dir: required for tfds dataset 'arrayrecord' "
                              "(nothing is downloaded at run time); did you mean data source 'array_record'?")
