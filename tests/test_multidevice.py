"""Data-parallel, FSDP and tensor-parallel meshes on 8 simulated CPU devices give the
same loss as one device, for the ViT and the T5; the Pallas MLP op (interpreted) per
shard on the (2, 2, 2) mesh gives the values and gradients of the jnp op; and (slow)
the (2, 4, 1) mesh and the ViT whose MLPs run those kernels on (2, 2, 2) train as one
device does."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env


def run_check(*flags: str) -> dict:
  """tests/multidevice_check.py on 8 simulated devices; its JSON result."""
  env = cli_env()
  # Optimization level 0: LLVM codegen is most of the compile time on CPU, which is
  # most of this test's time; every run here compiles the same way.
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "multidevice_check.py"),
                         *flags], capture_output=True, text=True, env=env, timeout=900,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def check_mesh_run(result: dict, one: list, mesh: str, shard: list) -> None:
  np.testing.assert_allclose(result[mesh][0], one[0], rtol=2e-5, err_msg=mesh)
  assert result[mesh][2] >= 1.0  # Restricted LN scales stayed >= 1 under sharding.
  assert result[mesh][3] == shard, (mesh, result[mesh][3])


def test_eight_devices_match_one_device():
  result = run_check()
  one, eight = result["one"], result["eight"]
  np.testing.assert_allclose(eight[0], one[0], rtol=2e-5)  # Loss per step.
  np.testing.assert_allclose(eight[1], one[1], atol=1e-3)  # Activation density.
  # The [32, 64] MLP kernel: whole on 1 device and under data parallelism, split over
  # fsdp (rows) and tensor (columns) on the other meshes.
  assert one[3] == eight[3] == [32, 64]
  check_mesh_run(result, one, "mesh_2_2_2", [16, 32])
  assert "pallas_mesh_2_2_2" not in result  # Only with --extended.
  pallas_op = result["pallas_op_2_2_2"]
  assert pallas_op["zero_block_share"] > 0.5  # The kernels had blocks to skip...
  for name, error in pallas_op["errors"].items():  # ...and y and every gradient match.
    assert error < 1e-5, (name, error)
  assert one[0][0] != one[0][-1]  # It trained: later losses differ from the first.
  assert one[2] >= 1.0 and eight[2] >= 1.0  # Restricted LN scales stayed >= 1.
  t5_one, t5_mixed = result["t5_one"], result["t5_mesh_2_2_2"]
  np.testing.assert_allclose(t5_mixed[0], t5_one[0], rtol=2e-5)
  np.testing.assert_allclose(t5_mixed[1], t5_one[1], atol=1e-3)
  assert t5_one[0][0] != t5_one[0][-1]
  assert "not divisible by the 8 data-parallel shards" in result["batch_error"]
  assert result["batch_error"].splitlines()[-1].startswith("Fix: pass --config.batch_size=8")
  assert "has 4 devices but 8 are present" in result["mesh_error"]


@pytest.mark.slow
def test_fsdp_in_groups_of_4_and_the_pallas_vit_on_the_mesh_match_one_device():
  result = run_check("--extended")
  for mesh, shard in (("mesh_2_4_1", [8, 64]), ("mesh_2_2_2", [16, 32]),
                      ("pallas_mesh_2_2_2", [16, 32])):
    check_mesh_run(result, result["one"], mesh, shard)
