"""launch/: the TPU script's dry run prints the gcloud commands of the whole flow, the GPU and
SLURM scripts set what they promise, and the local multi-process launcher rejects bad input."""

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config", "configs/vit_i1k.py:data_dir=gs://b/tfds", "--workdir", "gs://b/runs/vit"]


def sh(*cmd, env=None):
  return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})))


def commands(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_dry_run_prints_the_whole_flow():
  r = sh("bash", "launch/tpu.sh", "--name", "bvl-test", "--zone", "us-west4-a", "--type", "v5litepod-16",
         "--spot", "--project", "proj", "--dry-run", "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  assert [c[:5] for c in gcloud] == [["gcloud", "compute", "tpus", "tpu-vm", verb] for verb in
                                     ("create", "scp", "ssh", "ssh", "delete")]
  create, scp, install, train, delete = gcloud
  assert create[5] == "bvl-test" and "--accelerator-type=v5litepod-16" in create
  assert "--version=v2-alpha-tpuv5-lite" in create and "--spot" in create
  for c in gcloud:
    assert "--zone=us-west4-a" in c and "--project=proj" in c
  assert "--worker=all" in scp and "--worker=all" in install and "--worker=all" in train
  assert "pip install" in install[install.index("--command") + 1]
  remote = train[train.index("--command") + 1]
  assert "BVL_DISTRIBUTED=1 ~/bvl-venv/bin/python -m big_vision_lite.train" in remote
  assert shlex.split(remote.split("big_vision_lite.train", 1)[1]) == TRAIN
  assert delete[5] == "bvl-test" and "--quiet" in delete
  assert not os.path.exists(os.path.join(ROOT, "logs", "bvl-test.log"))  # nothing ran


def test_tpu_dry_run_queued_resource_and_keep():
  r = sh("bash", "launch/tpu.sh", "--name", "q", "--zone", "z", "--type", "v5p-8", "--queued", "--keep",
         "--dry-run", "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  gcloud = [c for c in commands(r.stdout) if c[0] == "gcloud"]
  assert gcloud[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--runtime-version=v2-alpha-tpuv5" in gcloud[0] and "--node-id=q" in gcloud[0]
  assert not any("delete" in c for c in gcloud)


def test_tpu_bad_input_is_one_line():
  r = sh("bash", "launch/tpu.sh", "--zone", "z", "--type", "v5p-8", "--dry-run", "--", *TRAIN)
  assert r.returncode == 2 and r.stderr.strip() == "error: --name is required"
  r = sh("bash", "launch/tpu.sh", "--name", "n", "--zone", "z", "--type", "v5p-8", "--dry-run")
  assert r.returncode == 2 and "trainer arguments missing" in r.stderr
  r = sh("bash", "launch/tpu.sh", "--name", "n", "--zone", "z", "--type", "tpu9-8", "--dry-run", "--", *TRAIN)
  assert r.returncode == 2 and "no default --version" in r.stderr


def _dry_run_xla_flags(*args, xla_flags="--mine"):
  r = sh("bash", "launch/gpu.sh", "--config", "configs/vit_shapes.py", *args,
         env={"DRY_RUN": "1", "XLA_FLAGS": xla_flags, "PYTHON": sys.executable})
  assert r.returncode == 0, r.stderr
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in r.stdout
  assert "-m big_vision_lite.train --config configs/vit_shapes.py" in r.stdout
  return r.stdout.split("XLA_FLAGS='", 1)[1].split("'", 1)[0].split()


def test_gpu_script_exports_the_configs_xla_flags_preset():
  from big_vision_lite.platform.gpu import xla_flags
  # The default preset, then what the user already had (which therefore wins).
  assert _dry_run_xla_flags() == [*xla_flags.GPU_DEFAULT, "--mine"]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags.GPU_DEFAULT
  assert _dry_run_xla_flags("--config.platform.xla_flags_preset=none") == ["--mine"]
  # A flag the user set is not set again by the preset.
  mine = "--xla_gpu_enable_triton_gemm=true"
  flags = _dry_run_xla_flags(xla_flags=mine)
  assert flags[-1] == mine and not any(f.startswith("--xla_gpu_enable_triton_gemm=f") for f in flags)


def test_gpu_script_bad_preset_is_one_line_exit_2():
  r = sh("bash", "launch/gpu.sh", "--config", "configs/vit_shapes.py",
         "--config.platform.xla_flags_preset=fast", env={"DRY_RUN": "1", "PYTHON": sys.executable})
  assert r.returncode == 2 and r.stderr.strip() == (
      "error: config.platform.xla_flags_preset='fast' is not one of none, gpu_default"), r.stderr


def test_gpu_script_without_a_gpu_is_one_line_naming_the_cuda_extra():
  # This machine's jax has no CUDA backend: what a user with a CPU-only install sees.
  r = sh("bash", "launch/gpu.sh", "--config", "configs/vit_shapes.py", env={"PYTHON": sys.executable})
  err = r.stderr.strip().splitlines()
  assert r.returncode == 2 and err[-1].startswith("error: jax finds no GPU") and '".[cuda]"' in err[-1], r.stderr
  assert "Traceback" not in r.stderr


def test_cuda_extra_pins_the_jax_cuda_build_of_the_pinned_jax():
  import tomllib
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  jax_pin = next(d for d in project["dependencies"] if d.startswith("jax=="))
  assert project["optional-dependencies"]["cuda"] == [f"jax[cuda12]=={jax_pin.split('==')[1]}"]
  assert "libtpu" in project["optional-dependencies"]["tpu"][0]


def test_tpu_workers_install_into_a_supported_python_venv():
  r = sh("bash", "launch/tpu.sh", "--name", "n", "--zone", "z", "--type", "v5litepod-16", "--dry-run", "--", *TRAIN)
  ssh = [c for c in commands(r.stdout) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  install = ssh[0][-1]
  train_cmd = next(a for a in ssh[1] if "big_vision_lite.train" in a)
  assert "python3.11 -m venv ~/bvl-venv" in install and "~/bvl-venv/bin/pip install" in install
  assert " pip install" not in install.replace("~/bvl-venv/bin/pip install", "")  # never the system pip
  assert "~/bvl-venv/bin/python -m big_vision_lite.train" in train_cmd


def test_slurm_script_is_valid_bash_and_one_task_per_gpu():
  assert sh("bash", "-n", "launch/slurm.sbatch").returncode == 0
  text = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
  assert "srun" in text and "big_vision_lite.train" in text
  # SLURM opens --output before the script runs: a folder there would have to exist already.
  output = next(line for line in text.splitlines() if line.startswith("#SBATCH --output="))
  assert "/" not in output.split("=", 1)[1], output


def test_local_multiprocess_rejects_bad_count():
  r = sh("bash", "launch/local_multiprocess.sh", "0", "--config", "x.py", env={"PYTHON": sys.executable})
  assert r.returncode == 2 and "must be >= 1" in r.stderr
