"""Two processes over localhost (jax.distributed, 4 simulated CPU devices each) train
the tiny ViT through the real CLI exactly as one process with 8 devices does on the
same global batches; only process 0 writes metrics and the summary; the checkpoint
they write together restores. And the CLI's multi-process flag errors."""
import glob
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEFAULT_CONFIG, REPO, cli_env, run_cli

PROCESSES = 2
# The default config at its smallest: 1 layer, 3 steps, every step logged. The mesh is
# FSDP over all 8 devices, so parameters, gradients and optimizer state are split
# across the two processes (every step all-gathers them over gloo) and each process
# writes its own shards of the checkpoint.
TINY = ["--config.num_steps=3", "--config.log_every=1", "--config.eval_every=3",
        "--config.checkpoint_every=3", "--config.model.num_layers=1",
        "--config.batch_size=16", "--config.optimizer.warmup_steps=0",
        "--config.mesh_shape=(1,8,1)"]
AUDIT = os.path.join(REPO, "tests", "write_audit")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, write_log: str | None = None) -> dict[str, str]:
  env = cli_env()
  # Optimization level 0 halves XLA's CPU compile time, most of this test's time;
  # the two processes and the stand-in compile alike.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  if write_log:
    env["PYTHONPATH"] = AUDIT + os.pathsep + env["PYTHONPATH"]
    env["SPARSE_JAX_WRITE_LOG"] = write_log
  return env


def _scalars(workdir: str, tag: str) -> dict[int, float]:
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)}


def _stop(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.communicate()


def test_two_processes_match_one_process(tmp_path, data_dir, cache_dir):
  workdir = str(tmp_path / "run")
  config = [f"--config={DEFAULT_CONFIG}", f"--config.data_dir={data_dir}", *TINY]
  # The stand-in for 2 processes builds the dataset first: the two CLI processes would
  # otherwise both build it into the same data_dir at once.
  reference = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "multihost_reference.py"), *config,
       f"--processes={PROCESSES}", f"--params_out={tmp_path / 'reference.npz'}"],
      env=_env(8), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  procs = [reference]
  try:
    for line in reference.stdout:  # tfds announces a dataset it builds on stdout.
      if line.strip() == "prepared":
        break
    assert reference.poll() is None, reference.stderr.read()[-3000:]
    address = f"127.0.0.1:{_free_port()}"
    for i in range(PROCESSES):
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "sparse_jax.main", *config, f"--workdir={workdir}",
           f"--compilation_cache_dir={cache_dir}", f"--coordinator_address={address}",
           f"--num_processes={PROCESSES}", f"--process_id={i}",
           "--initialization_timeout=120"],
          env=_env(4, str(tmp_path / f"writes_{i}.txt")), cwd=REPO,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    _stop(procs)
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  expected = json.loads(outputs[0][0].strip().splitlines()[-1])
  stderr_0, stderr_1 = outputs[1][1], outputs[2][1]
  assert "Joined as process 0 of 2" in stderr_0
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in stderr_0  # 8 global devices.
  assert "step 3/3" in stderr_0 and "step 3/3" not in stderr_1  # Progress: process 0.

  # Every step's loss, from process 0's TensorBoard events, matches the stand-in's.
  losses = _scalars(workdir, "train/loss")
  assert sorted(losses) == [1, 2, 3]
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], expected["losses"], rtol=2e-5)
  assert expected["losses"][0] != expected["losses"][-1]  # It trained.
  # The eval split, sharded over the processes, gives the one-process means.
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["step"] == 3
  for key in ("loss", "accuracy", "activation_density/mean"):
    np.testing.assert_allclose(summary[f"eval/{key}"], expected["eval"][key], rtol=1e-4)

  # Only process 0 wrote metrics, config and summary.
  events = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert len(events) == 1, events
  # Named with its writer's pid: process 0's worker (its supervisor, procs[1], starts
  # the worker that trains; see sparse_jax/supervisor.py).
  worker_pid = re.search(r"Joined as process 0 of 2, .* \(pid (\d+)\)", stderr_0).group(1)
  assert f".{worker_pid}." in os.path.basename(events[0])
  written = [set(os.path.basename(p) for p in
                 (tmp_path / f"writes_{i}.txt").read_text().split("\n") if p)
             for i in range(PROCESSES)]
  assert {"summary.json", "config.json"} <= written[0], written[0]
  assert not {"summary.json", "config.json"} & written[1], written[1]

  # The checkpoint both processes wrote restores (on 1 device) to the stand-in's params.
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  path = os.path.join(workdir, "checkpoints", "3", "state")
  checkpointer = ocp.StandardCheckpointer()
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # Not the 8 it was saved on.
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        checkpointer.metadata(path).item_metadata)
  restored = checkpointer.restore(path, target)
  assert int(restored["step"]) == 3
  params = traverse_util.flatten_dict(restored["params"], sep="/")
  reference_params = np.load(tmp_path / "reference.npz")
  assert set(params) == set(reference_params.files)
  for name in reference_params.files:
    # Loose: Adam turns float noise in near-zero gradients (attention key biases get
    # none at all) into steps of ~lr; a wrong or misplaced shard is off by ~1e-2.
    np.testing.assert_allclose(np.asarray(params[name]), reference_params[name],
                               rtol=1e-3, atol=1e-4, err_msg=name)


def _assert_clean_error(proc, *phrases):
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr and "Check failure" not in proc.stderr, \
      proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("Fix:"), proc.stderr[-1000:]
  for phrase in phrases:
    assert phrase in proc.stderr, (phrase, proc.stderr[-1000:])


def test_unreachable_coordinator_times_out_cleanly(tmp_path):
  address = f"127.0.0.1:{_free_port()}"  # Nothing listens there.
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}",
                 f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
                 "--initialization_timeout=3", timeout=120)
  _assert_clean_error(proc, f"could not reach the coordinator at {address}",
                      "timed out after 3 s", "start process 0",
                      "raise --initialization_timeout")
  assert not (tmp_path / "run").exists()


def test_job_that_does_not_assemble_times_out_cleanly(tmp_path):
  """Process 0 starts the coordinator, process 1 never comes: JAX would abort with a
  C++ stack trace a few seconds after the timeout; the CLI ends first, with a fix."""
  address = f"127.0.0.1:{_free_port()}"
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}",
                 f"--coordinator_address={address}", "--num_processes=2", "--process_id=0",
                 "--initialization_timeout=3", timeout=120)
  _assert_clean_error(proc, f"Process 0 of 2 started the coordinator at {address}",
                      "not all 2 processes connected within 3 s", "start all 2 processes")
  assert not (tmp_path / "run").exists()


def test_coordinator_port_in_use(tmp_path):
  with socket.socket() as busy:
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}",
                   f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   "--process_id=0", "--initialization_timeout=3", timeout=120)
  _assert_clean_error(proc, f"cannot start the coordinator on port {port}",
                      "pick a free port")


@pytest.mark.parametrize("flags, phrase", [
    (["--num_processes=2"], "--num_processes=2 given without --coordinator_address and "
                            "--process_id"),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
     "--process_id=2 is not in 0..1"),
    (["--coordinator_address=127.0.0.1:1234", "--process_id=0"],
     "--coordinator_address and --process_id given without --num_processes"),
    (["--coordinator_address=127.0.0.1", "--num_processes=2", "--process_id=0"],
     "is not HOST:PORT"),
    (["--heartbeat_timeout=0"], "--heartbeat_timeout=0 must be a positive number"),
])
def test_bad_multiprocess_flags_fail_before_jax(tmp_path, flags, phrase):
  # -X importtime lists every module imported: jax must not be among them.
  env = cli_env()
  env["PYTHONPROFILEIMPORTTIME"] = "1"
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}", *flags,
                 env=env, timeout=120)
  _assert_clean_error(proc, phrase)
  imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  assert "sparse_jax.distributed" in imported and "jax" not in imported


_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_NUM_SLICES")


@pytest.fixture(name="no_cluster")
def _no_cluster(monkeypatch):
  for name in _CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_single_host_does_not_initialize(no_cluster):
  del no_cluster
  import jax  # pylint: disable=g-import-not-at-top
  from sparse_jax import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.detect_cluster() is None
  assert distributed.initialize(distributed.Options()) is None
  assert distributed.initialize(distributed.Options(num_processes=1)) is None
  assert not jax.distributed.is_initialized()


def test_detects_jobs_of_several_processes_only(no_cluster):
  from sparse_jax import distributed  # pylint: disable=g-import-not-at-top
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[01-02]", SLURM_PROCID="0",
               SLURM_LOCALID="0")
  for name, value in slurm.items():
    no_cluster.setenv(name, value)
  no_cluster.setenv("SLURM_NTASKS", "1")  # srun -n 1: a single process.
  assert distributed.detect_cluster() is None
  no_cluster.setenv("SLURM_NTASKS", "4")
  assert distributed.detect_cluster() == ("SLURM", 4)
  for name in slurm:
    no_cluster.delenv(name)  # SLURM_NTASKS alone (an salloc shell, no srun step): no.
  assert distributed.detect_cluster() is None
  no_cluster.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
  no_cluster.setenv("OMPI_COMM_WORLD_SIZE", "2")
  assert distributed.detect_cluster() == ("Open MPI", 2)


def test_detects_cloud_tpu_pod_slices_through_jax(no_cluster):
  """The TPU answer comes from JAX's own detector classes: a JAX upgrade that moves
  them fails here, not silently on a pod."""
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  from sparse_jax import distributed  # pylint: disable=g-import-not-at-top
  no_cluster.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")  # A v4-32: 4 hosts.
  no_cluster.setenv("MEGASCALE_NUM_SLICES", "1")  # (Else JAX asks the metadata server.)
  assert distributed.detect_cluster() is None  # Not on a TPU VM: never.
  no_cluster.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  no_cluster.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  assert distributed.detect_cluster() == ("Cloud TPU", 4)
  no_cluster.setenv("MEGASCALE_NUM_SLICES", "2")
  assert distributed.detect_cluster() == ("Cloud TPU", 8)
  no_cluster.setenv("TPU_WORKER_HOSTNAMES", "w0")  # One host (v4-8): no.
  no_cluster.setenv("MEGASCALE_NUM_SLICES", "1")
  assert distributed.detect_cluster() is None
