"""Export our checkpoints to PyTorch libraries (timm, ...) and import big_vision checkpoints.

CLI: `python -m big_vision_lite.convert --help`. Programmatic entry points live in
`convert.pipeline`; per-target tables in `timm_vit`, `hf_siglip` / `hf_siglip2` (transformers),
`open_clip_siglip`, `bigvision` (+ `tensorstore_ckpt` reader); two-tower specs in
`towers`; shared machinery in `tables`. torch is only imported by the export paths (see `torch_env`).
"""

from big_vision_lite.convert.tables import ConversionError, UnsupportedExport

__all__ = ["ConversionError", "UnsupportedExport"]
