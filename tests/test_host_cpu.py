"""host_cpu: the CPU's description for benchmark headers and its signature for caches."""

import os

from big_vision_lite.platform.cpu import host as host_cpu

_AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse avx fma avx2 avx512f avx512bw avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse avx fma avx2 avx512f avx512bw avx512_bf16
"""

_INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse avx fma avx2 avx512f avx512_bf16 amx_tile
"""

_ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_describe_names_vendor_model_and_vector_isa(tmp_path):
  amd = host_cpu.describe(_write(tmp_path, "amd", _AMD))
  assert amd.startswith("AMD EPYC (AuthenticAMD family 25 model 17), ")
  assert f"{os.cpu_count()} cores" in amd
  assert amd.endswith("avx2 fma avx512f avx512_bf16")
  intel = host_cpu.describe(_write(tmp_path, "intel", _INTEL))
  assert intel.startswith("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (GenuineIntel family 6 "
                          "model 143)")
  assert intel.endswith("avx512_bf16 amx_tile")
  arm = host_cpu.describe(_write(tmp_path, "arm", _ARM))
  assert "(0x41)" in arm and arm.endswith("asimd sve")


def test_signature_tells_cpus_apart_and_is_stable(tmp_path):
  amd, intel, arm = (_write(tmp_path, n, t) for n, t in
                     (("amd", _AMD), ("intel", _INTEL), ("arm", _ARM)))
  sigs = {host_cpu.signature(p) for p in (amd, intel, arm)}
  assert len(sigs) == 3
  assert host_cpu.signature(amd) == host_cpu.signature(amd)
  # The same model with one more feature flag (another microcode or hypervisor) is another CPU
  # for -march=native code.
  more = _write(tmp_path, "amd2", _AMD.replace("avx512_bf16", "avx512_bf16 avx512_fp16", 1))
  assert host_cpu.signature(more) != host_cpu.signature(amd)


def test_no_cpuinfo_still_describes(tmp_path):
  missing = str(tmp_path / "none")
  assert host_cpu.describe(missing)  # platform's name, never an exception
  assert len(host_cpu.signature(missing)) == 12


def test_this_host():
  assert host_cpu.model_name() in host_cpu.describe()
