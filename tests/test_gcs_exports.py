"""Plots and exports with gs:// paths, against the local GCS emulator (tests/gcs_emulator.py).

Checkpoints are written locally here (Orbax writes to this emulator fail, see
docs/storage.md) and copied to the bucket where a test reads a gs:// workdir.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gcs_emulator  # noqa: E402  (before gcsfs is imported)

pytest.importorskip("gcsfs", reason="the [test] extra installs gcsfs")
pytest.importorskip("gcp_storage_emulator.server", reason="the [test] extra installs it")

from big_vision_lite import storage  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = gcs_emulator.BUCKET
gcs = gcs_emulator.fixture(BUCKET)
PNG = b"\x89PNG\r\n\x1a\n"


def _py(args, env, **kw):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **env,
                        "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=300, **kw)


def test_plot_reads_and_writes_gcs(gcs):
  run = f"gs://{BUCKET}/plotrun"
  rows = [{"step": s, "loss": 1.0 / s, "val_acc": 0.1 * s} for s in range(1, 6)]
  with storage.open_file(f"{run}/metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # half-written last line
  r = _py(["-m", "big_vision_lite.tools.plot", run], gcs)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == f"{run}/curves.png"
  with storage.open_file(f"{run}/curves.png", "rb") as f:
    assert f.read(8) == PNG
  r = _py(["-m", "big_vision_lite.tools.plot", run, "--keys", "loss", "--out", f"gs://{BUCKET}/plots/l.png"], gcs)
  assert r.returncode == 0, r.stderr[-2000:]
  assert storage.exists(f"gs://{BUCKET}/plots/l.png")
  r = _py(["-m", "big_vision_lite.tools.plot", f"gs://{BUCKET}/no-run"], gcs)
  assert r.returncode == 2 and r.stderr.strip() == f"error: no metrics file at gs://{BUCKET}/no-run/metrics.jsonl"
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  """A local workdir: config.json and an Orbax checkpoint of a tiny ViT (params also under img/)."""
  pytest.importorskip("torch")
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  pytest.importorskip("timm")
  import flax
  import jax
  from big_vision_lite.checkpoint import Checkpointer, flatten_with_names
  from big_vision_lite.convert import tables
  from big_vision_lite.models import vit as vit_lib
  kw = dict(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=4, head_zeroinit=False,
            pool_type="gap", posemb="sincos2d", num_classes=5)
  model = vit_lib.vit(**kw)
  p = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"])
  rng = np.random.default_rng(0)
  flat = {k: (0.3 * rng.standard_normal(np.shape(v))).astype(np.float32) for k, v in flatten_with_names(p).items()}
  workdir = tmp_path_factory.mktemp("gcs_exports") / "run"
  with Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1) as ckpt:
    ckpt.save(1, {"params": tables.nest(flat), "step": np.int32(1)}, force=True)
    ckpt.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(dict(
      model_name="vit", model=kw, input=dict(pp="decode|resize(16)|value_range(-1, 1)"))))
  return str(workdir), flat


def _download(path, tmp_path):
  with storage.local_copy(path) as local:
    dst = tmp_path / os.path.basename(local)
    import shutil
    shutil.copytree(local, dst)
  return str(dst)


def test_convert_local_checkpoint_to_gcs_timm_folder(gcs, local_run, tmp_path, capsys):
  from big_vision_lite.convert import timm_vit
  from big_vision_lite.convert.__main__ import main
  workdir, flat = local_run
  out = f"gs://{BUCKET}/exports/timm"
  assert main(["--workdir", workdir, "--to", "timm", "--out", out]) == 0
  log = capsys.readouterr().out
  assert "verify: max |ours - timm|" in log and f"uploaded to {out}" in log
  assert sorted(storage.listdir(out)) == ["config.json", "model.safetensors"]
  assert json.loads(storage.read_text(f"{out}/config.json"))["model_args"]["img_size"] == [16, 16]
  from safetensors.numpy import load_file
  local = _download(out, tmp_path)
  np.testing.assert_array_equal(load_file(os.path.join(local, "model.safetensors"))["head.weight"],
                                flat["head/kernel"].T)
  timm_vit.load(local)  # a strict load in timm
  # Back again: the gs:// timm folder imports as a gs:// model_init .npz.
  init = f"gs://{BUCKET}/exports/init.npz"
  assert main(["--from", "timm", "--in", out, "--out", init]) == 0
  assert "verify: max |imported - source|" in capsys.readouterr().out
  with storage.open_file(init, "rb") as f, np.load(io.BytesIO(f.read())) as z:
    np.testing.assert_allclose(z["head/kernel"], flat["head/kernel"], atol=1e-6)
  # A failed export uploads nothing.
  bad = f"gs://{BUCKET}/exports/bad"
  assert main(["--workdir", workdir, "--to", "timm", "--subtree", "nope", "--out", bad]) == 1
  assert not storage.exists(bad)
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_bigvision_npz_from_and_to_gcs(gcs, local_run, capsys):
  from big_vision_lite.convert.__main__ import main
  _, flat = local_run
  src = f"gs://{BUCKET}/bv/vit.npz"
  buf = io.BytesIO()
  np.savez(buf, **{f"params/{k}": v for k, v in flat.items()})
  with storage.open_file(src, "wb") as f:
    f.write(buf.getvalue())
  out = f"gs://{BUCKET}/bv/init.npz"
  assert main(["--from", "bigvision", "--in", src, "--out", out, "--image_size", "16"]) == 0, capsys.readouterr()
  with storage.open_file(out, "rb") as f, np.load(io.BytesIO(f.read())) as z:
    assert set(z.files) == set(flat)


def test_bigvision_tensorstore_checkpoint_on_gcs(gcs, tmp_path, capsys):
  ts = pytest.importorskip("tensorstore")
  from big_vision_lite.convert import tensorstore_ckpt
  step = tmp_path / "checkpoint.bv-000000003"
  want = {"params~head~kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "opt~x": np.ones(2, np.float32)}
  for name, v in want.items():
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(step / name)}},
                  create=True, dtype=ts.float32, shape=v.shape).result()
    arr.write(v).result()
  (tmp_path / "checkpoint.bv-LAST").write_text("000000003")
  base = f"gs://{BUCKET}/tsckpt"
  storage.upload_tree(str(tmp_path), base)
  flat = tensorstore_ckpt.read(f"{base}/checkpoint.bv")
  assert list(flat) == ["head/kernel"]
  np.testing.assert_array_equal(flat["head/kernel"], want["params~head~kernel"])


def test_extract_encoder_to_gcs(gcs, local_run):
  from big_vision_lite.tools import extract_encoder
  workdir, flat = local_run
  out = f"gs://{BUCKET}/enc/head.npz"
  assert extract_encoder.main(["--workdir", workdir, "--out", out, "--subtree", "head"]) == 0
  with storage.open_file(out, "rb") as f, np.load(io.BytesIO(f.read())) as z:
    np.testing.assert_array_equal(z["kernel"], flat["head/kernel"])


def test_gcs_workdir_export_reads_orbax_from_the_bucket(gcs, local_run, tmp_path, capsys):
  """A gs:// workdir in: config.json through storage, the params through Orbax/tensorstore on the emulator."""
  from big_vision_lite.convert.__main__ import main
  workdir, flat = local_run
  remote = f"gs://{BUCKET}/orbaxrun"
  storage.upload_tree(workdir, remote)
  out = str(tmp_path / "timm")
  rc = main(["--workdir", remote, "--to", "timm", "--out", out])
  cap = capsys.readouterr()
  assert rc == 0, cap.err[-2000:]
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(load_file(os.path.join(out, "model.safetensors"))["head.weight"],
                                flat["head/kernel"].T)


def test_tokenizers_read_gcs_files(gcs, tmp_path):
  from big_vision_lite.data import tokenizers
  vocab = f"gs://{BUCKET}/tok/vocab.txt"
  storage.copy(tokenizers.SHAPES_VOCAB, vocab)
  tok = tokenizers.get_tokenizer(vocab)
  assert tok.encode("a red circle") == tokenizers.get_tokenizer("bvl_shapes").encode("a red circle")
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  sentences = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue") for s in ("circle", "square")
               for b in ("white", "black")] * 5
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=25,
                                 eos_id=1, pad_id=0, unk_id=2, bos_id=-1, minloglevel=2)
  with storage.open_file(f"gs://{BUCKET}/tok/spm.model", "wb") as f:
    f.write(model.getvalue())
  sp = tokenizers.get_tokenizer(f"gs://{BUCKET}/tok/spm.model")
  assert sp.vocab_size == 25 and sp.decode(sp.encode("a red circle")) == "a red circle"
  with pytest.raises(FileNotFoundError):
    tokenizers.SentencePieceTokenizer(f"gs://{BUCKET}/tok/none.model")


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
  """A local two_towers workdir (the one tests/test_convert_siglip.py exports) and its flat params."""
  pytest.importorskip("torch")
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  pytest.importorskip("transformers")
  pytest.importorskip("open_clip")
  from test_convert_siglip import L, MODEL, random_params
  from big_vision_lite.checkpoint import Checkpointer
  from big_vision_lite.convert import tables
  workdir = tmp_path_factory.mktemp("gcs_siglip") / "run"
  flat = random_params(MODEL)
  with Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1) as ckpt:
    ckpt.save(3, {"params": tables.nest(flat), "step": np.int32(3)}, force=True)
    ckpt.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(dict(
      model_name="two_towers", model=MODEL,
      input=dict(pp=f"decode|resize(16)|value_range(-1, 1)|tokenize({L}, model='bvl_shapes', key='caption', "
                 "key_result='labels')"))))
  return str(workdir), flat


def _no_local_paths(folder, *local):
  """Asserts no file below `folder` names a local temporary path (staging folder, the tmp dir)."""
  import tempfile
  needles = [tempfile.gettempdir(), "bvl_stage_", *local]
  for root, _, names in os.walk(folder):
    for n in names:
      with open(os.path.join(root, n), "rb") as f:
        data = f.read()
      for needle in needles:
        assert needle.encode() not in data, f"{os.path.join(root, n)} names {needle}"


def _ours(flat, spec, texts_ids, images):
  from test_convert_siglip import MODEL
  from big_vision_lite.convert import towers
  return towers.run_ours(flat, towers.build_ours(spec, MODEL), images, texts_ids)


def test_cli_exports_transformers_to_gcs(gcs, siglip_run, tmp_path):
  """`python -m big_vision_lite.convert --to transformers --out gs://...`: the folder in the bucket
  loads in transformers (offline) and matches our logits; no local path is written into it."""
  from big_vision_lite.convert import towers
  workdir, flat = siglip_run
  out = f"gs://{BUCKET}/exports/siglip_hf"
  r = _py(["-m", "big_vision_lite.convert", "--workdir", workdir, "--to", "transformers", "--out", out], gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "verify: max |ours - transformers|" in r.stdout and f"uploaded to {out}" in r.stdout
  assert {"config.json", "model.safetensors"} <= set(storage.listdir(out))
  local = _download(out, tmp_path)
  _no_local_paths(local, workdir)
  import torch
  import transformers
  model = transformers.SiglipModel.from_pretrained(local, local_files_only=True).eval()
  spec = towers.spec_from_params(flat, dict(json.loads(open(os.path.join(workdir, "config.json")).read())["model"]),
                                 image_size=16)
  images, texts = towers.fixed_inputs(spec)
  ours = _ours(flat, spec, texts, images)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(texts.astype(np.int64)),
                   pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits_per_image
  np.testing.assert_allclose(theirs.numpy(), ours["logits"], atol=1e-4, rtol=0)  # the converter's limit


def test_cli_exports_open_clip_to_gcs_naming_the_bucket_not_the_staging_folder(gcs, siglip_run, tmp_path):
  """`--to open_clip --out gs://...`: open_clip_config.json names the gs:// folder's trunk (not the
  deleted staging folder); downloaded and pointed at its new place as the CLI's note says, it loads
  in open_clip and matches our logits."""
  from big_vision_lite.convert import open_clip_siglip, towers
  workdir, flat = siglip_run
  out = f"gs://{BUCKET}/exports/siglip_oc"
  r = _py(["-m", "big_vision_lite.convert", "--workdir", workdir, "--to", "open_clip", "--out", out], gcs)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "verify: max |ours - open_clip|" in r.stdout and f"uploaded to {out}" in r.stdout
  assert "bvl_stage_" not in r.stdout  # the log names where the folder is, not where it was staged
  assert f"local-dir:{out}/timm" in r.stdout
  local = _download(out, tmp_path)
  _no_local_paths(local, workdir)
  cfg = json.loads(open(os.path.join(local, open_clip_siglip.CONFIG)).read())["model_cfg"]
  assert cfg["vision_cfg"]["timm_model_name"] == f"local-dir:{out}/timm"
  assert cfg["text_cfg"]["hf_tokenizer_name"] == out
  open_clip_siglip.relocate(local, local)  # what the note tells the user to edit
  import open_clip
  model = open_clip.create_model(f"local-dir:{local}").eval()
  spec = towers.spec_from_params(flat, dict(json.loads(open(os.path.join(workdir, "config.json")).read())["model"]),
                                 image_size=16)
  images, texts = towers.fixed_inputs(spec)
  theirs = open_clip_siglip.run_torch(model, images, texts)
  np.testing.assert_allclose(theirs["logits"], _ours(flat, spec, texts, images)["logits"], atol=1e-4, rtol=0)
