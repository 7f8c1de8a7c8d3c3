"""Data source `bvl_shapes_multi[/tiny]`: the several-object shapes dataset, built on first use."""

from __future__ import annotations

import ml_collections

from big_vision_lite.data import sources


@sources.register("bvl_shapes_multi", keys=("data_dir",))
def _open_shapes_multi(data_config: ml_collections.ConfigDict, config_key: str):
  from big_vision_lite.data import shapes_multi
  split = sources._split_of(data_config, config_key)
  name = data_config.name
  config = name.split("/")[1] if "/" in name else "default"
  data_dir = shapes_multi.ensure_built(data_config.get("data_dir", None), config=config)
  return sources._tfds_source(f"{shapes_multi.NAME}/{config}", split, data_dir, config_key)
