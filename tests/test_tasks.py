"""The Task base class refuses config.task keys a task does not read, naming the key and the task."""

import ml_collections
import pytest

from big_vision_lite.config import ConfigError
from big_vision_lite.tasks import get_task


@pytest.mark.parametrize("name, good", [("classification", "mixup"), ("contrastive", "chunked"),
                                        ("captioning", "tokenizer")])
def test_unknown_task_key_is_refused(name, good):
  config = ml_collections.ConfigDict({"name": name, "lossy": 1, good: None})
  with pytest.raises(ConfigError, match=rf"config\.task\.lossy: unknown key for task '{name}' "
                                        rf".*\(allowed: .*\b{good}\b.*\)"):
    get_task(config, model=None)
