"""The `mixture` data source: epoch shares as the weights, each member's pp, deterministic and
resumable through the train iterator, and bad member configs as one-line config errors."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from big_vision_lite.config import ConfigError
from big_vision_lite.data import pipeline, sources, sources_mixture
from big_vision_lite import config_check

from helpers import run_cli


@pytest.mark.parametrize("lengths,weights", [
    ([20000, 20000], [1, 1]), ([20000, 20000], [3, 1]), ([100, 1000], [1, 1]),
    ([7, 5, 3], [0.2, 0.5, 0.3]), ([1, 999], [1, 1e-3])])
def test_epoch_counts_hold_every_example_in_the_weights_shares(lengths, weights):
  counts = sources_mixture.epoch_counts(lengths, weights)
  total = sum(counts)
  assert all(c >= n for c, n in zip(counts, lengths))  # every example at least once
  for c, w in zip(counts, weights):  # each share as the weights', up to rounding of one record
    assert abs(c / total - w / sum(weights)) <= len(lengths) / total
  # The epoch is the shortest that holds the member that needs it most.
  assert total <= max(math.ceil(n * sum(weights) / w) for n, w in zip(lengths, weights)) + len(lengths)


def test_records_map_to_their_member_in_index_order():
  a = [{"v": np.int64(i)} for i in range(3)]
  b = [{"v": np.int64(100 + i)} for i in range(4)]
  mix = sources_mixture.MixtureSource(["a", "b"], [a, b], [2.0, 1.0], ["", ""])
  assert mix.counts == [8, 4]  # b needs 12 records for its share; a repeats to fill 8
  got = [(int(mix[i][sources_mixture.MEMBER_KEY]), int(mix[i]["v"])) for i in range(len(mix))]
  assert got == [(0, i % 3) for i in range(8)] + [(1, 100 + i) for i in range(4)]
  with pytest.raises(IndexError):
    mix[len(mix)]


def _config(**members) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="mixture", members=members))


def test_each_member_runs_its_own_pp_then_the_shared_one():
  data = _config(
      single=dict(name="bvl_shapes/tiny", split="train", weight=1.0, pp="shapes_as_multi"),
      multi=dict(name="bvl_shapes_multi/tiny", split="train", weight=1.0))
  source = sources.get_source(data)
  assert isinstance(source, sources_mixture.MixtureSource) and len(source) == 2 * 512
  from big_vision_lite.data import ops
  fn = sources_mixture.preprocess_for(source, ops.get_preprocess_fn(
      "shapes_multi_regions|keep('num_objects', 'region_texts', 'region_boxes', 'labels')"))
  k = source.names.index("single")  # members in the config's key order
  start = sum(source.counts[:k])
  single = fn(source[start], np.random.default_rng(0))
  raw = source.sources[k][0]
  assert int(single["num_objects"]) == 1 and single["labels"][0] == raw["label"]
  np.testing.assert_array_equal(single["region_boxes"][0], raw["box"])
  from big_vision_lite.data import shapes
  assert single["region_texts"] == [f"the {shapes.COLOR_NAMES[raw['color']]} "
                                    f"{shapes.CLASS_NAMES[raw['label']]}"]
  m = 1 - k
  multi = fn(source[sum(source.counts[:m])], np.random.default_rng(0))
  assert int(multi["num_objects"]) == int(source.sources[m][0]["num_objects"])


def _train_iterator(data):
  member_of = lambda ex, rng: {"single": np.int64("label" in ex)}  # bvl_shapes has `label`
  return pipeline.make_train_iterator(data, member_of, global_batch_size=64, seed=3,
                                      process_index=0, process_count=1)


def test_train_iterator_reads_the_shares_and_resumes_exactly():
  data = _config(single=dict(name="bvl_shapes/tiny", split="train", weight=1.0),
                 multi=dict(name="bvl_shapes_multi/tiny", split="train", weight=3.0))
  it = _train_iterator(data)
  epoch = [next(it)["single"] for _ in range(2048 // 64)]  # counts 512 + 1536: one epoch
  assert int(np.sum(epoch)) == 512
  state = it.get_state()
  after = [next(it)["single"] for _ in range(3)]
  resumed = _train_iterator(data)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack([next(resumed)["single"] for _ in range(3)]), np.stack(after))
  pipeline.close_iterator(it)
  pipeline.close_iterator(resumed)


@pytest.mark.parametrize("members,message", [
    ({}, "config.input.data.members must map member names"),
    (dict(a=dict(name="bvl_shapes", split="train")), "config.input.data.members.a.weight must be a number > 0"),
    (dict(a=dict(name="bvl_shapes", split="train", weight=-1.0)), "members.a.weight must be a number > 0"),
    (dict(a=dict(name="mixture", weight=1.0, members=dict())), "a mixture cannot be a member"),
    (dict(a=dict(name="bvl_shapes", split="train", weight=1.0, spilt="x")),
     "config.input.data.members.a.spilt: unknown key for data source 'bvl_shapes'"),
    (dict(a=dict(name="bvl_shapes", split="train", weight=1.0, pp="shapes_as_mult")),
     "config.input.data.members.a.pp: unknown preprocessing op"),
])
def test_bad_member_configs_name_the_key(members, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    config_check.check_data(_config(**members), "config.input.data")


SHAPES = ("configs/siglip2_shapes.py:res=32,width=16,depth=1,dec_depth=1,heads=2,patch=8,batch=8,"
          "steps=2,workers=0,sd_start=1")


def test_a_bad_weight_through_the_cli_is_one_line_exit_2(tmp_path):
  out = run_cli(SHAPES, ["--config.input.data.members.single.weight=0"], tmp_path / "run",
                devices=1, timeout=120)
  err = out.stderr.strip()
  assert out.returncode == 2 and len(err.splitlines()) == 1, err
  assert "config.input.data.members.single.weight must be a number > 0, got 0.0" in err
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_mixture_is_recorded_in_config_json(tmp_path):
  """The shipped recipe's mixture trains and its members land in config.json as given."""
  out = run_cli(SHAPES, ["--config.evals={}", "--config.profile.num_steps=0", "--config.schedule.warmup_steps=1",
                         "--config.mfu_peak_flops=1e12"], tmp_path / "run", devices=1, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())["input"]["data"]
  assert saved["name"] == "mixture"
  assert {k: (m["name"], m["weight"]) for k, m in saved["members"].items()} == {
      "single": ("bvl_shapes", 1.0), "multi": ("bvl_shapes_multi", 1.0)}
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")


def test_an_eval_on_a_mixture_is_refused_before_training():
  from big_vision_lite import config as config_lib
  config = config_lib.load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), SHAPES))
  with config.unlocked():
    config.evals.zeroshot.data = config.input.data
  with pytest.raises(ConfigError, match=r"config\.evals\.zeroshot\.data\.name: a mixture is for training"):
    config_lib.validate(config, 1)
