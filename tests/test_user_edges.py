"""Issue 26's edges, each through the command line as a user meets them: a config file
that does not load, a flag value of the wrong type, a disk that fills or a workdir that
goes away mid-run, reports of unlike runs. Each ends in the two-line error (the last
line 'Fix:'), exit code 1, and nothing already written lost."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import DEFAULT_CONFIG, REPO, assert_clean_error, cli_env, run_cli


def _study(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "sparse_jax.study", *args],
                        capture_output=True, text=True, timeout=timeout, env=cli_env(),
                        cwd=REPO)


# ------------------------------------------------------------------------ 1. config files
# (file body, the reason shown, the line the message points at). Each is a config file a
# user could write; the line numbers are of the file as written below.
BROKEN_CONFIGS = {
    "syntax_error": ("""\
        import ml_collections
        def get_config(arg=None):
          c = ml_collections.ConfigDict(
          return c
        """, "SyntaxError: '(' was never closed", 3),
    "raises_in_a_helper": (f"""\
        import sys
        sys.path.insert(0, {REPO!r})
        from configs import default
        def data_location():
          raise RuntimeError("set IMAGENET_DIR first")
        def get_config(arg=None):
          c = default.get_config(arg)
          c.data_dir = data_location()
          return c
        """, "RuntimeError: set IMAGENET_DIR first", 5),
    "value_error_with_message": ("""\
        def get_config(arg=None):
          raise ValueError("width must be a multiple of 8")
        """, "ValueError: width must be a multiple of 8", 2),
    "import_error": ("""\
        import module_that_is_not_installed
        def get_config(arg=None):
          return None
        """, "ModuleNotFoundError: No module named 'module_that_is_not_installed'", 1),
    "os_error": ("""\
        def get_config(arg=None):
          return open("/nonexistent/sizes.txt").read()
        """, "FileNotFoundError: [Errno 2] No such file or directory", 2),
}


def _write_config(tmp_path, name):
  body, reason, line = BROKEN_CONFIGS[name]
  path = tmp_path / f"{name}.py"
  path.write_text(textwrap.dedent(body))
  return str(path), reason, line


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
@pytest.mark.parametrize("program", ["main", "study"])
def test_config_file_that_does_not_load(tmp_path, name, program):
  """The file, its line and the reason, from the user's frames (none of ours)."""
  path, reason, line = _write_config(tmp_path, name)
  workdir = tmp_path / "run"
  run = run_cli if program == "main" else _study
  proc = run(f"--config={path}", f"--workdir={workdir}")
  assert_clean_error(proc, f"Config file {path} does not load: {reason}",
                     f"{path}:{line}",
                     f"Fix: correct {path} at line {line}")
  assert "site-packages" not in proc.stderr and "sparse_jax/" not in proc.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("program", ["main", "study"])
def test_config_file_that_does_not_exist(tmp_path, program):
  run = run_cli if program == "main" else _study
  proc = run(f"--config={tmp_path / 'nothere.py'}", f"--workdir={tmp_path / 'run'}")
  assert_clean_error(proc, "Could not load the config file", "No such file or directory")
  assert not (tmp_path / "run").exists()


def test_config_file_without_get_config(tmp_path):
  path = tmp_path / "no_function.py"
  path.write_text("WIDTH = 64\n")
  proc = run_cli(f"--config={path}:vanilla", f"--workdir={tmp_path / 'run'}")
  assert_clean_error(proc, "has no attribute 'get_config'",
                     f"Fix: define get_config('vanilla') in {path}")


# -------------------------------------------------------------------------- 2. flag types
@pytest.mark.parametrize("flag, phrases", [
    ("--config.num_steps=1e3", ["config.num_steps needs an integer; '1e3' is not",
                                "Fix: pass an integer, e.g. --config.num_steps=1000."]),
    ("--config.batch_size=", ["--config.batch_size=: config.batch_size needs an integer; "
                              "the value is empty", "e.g. --config.batch_size="]),
    ("--config.optimizer.learning_rate=fast",
     ["needs a number; 'fast' is not a number",
      "e.g. --config.optimizer.learning_rate="]),
    ("--config.metrics.theory=maybe", ["needs true or false",
                                       "e.g. --config.metrics.theory=true"]),
    ("--initialization_timeout=5min", ["--initialization_timeout needs an integer; "
                                       "'5min' is not", "e.g. --initialization_timeout="]),
])
def test_flag_value_of_the_wrong_type(tmp_path, flag, phrases):
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}", flag)
  assert_clean_error(proc, flag.split("=")[0], *phrases)
  assert "invalid literal" not in proc.stderr and "--helpshort" not in proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, phrases", [
    ("--grid=model.mlp_dim=64,abc",
     ["--grid=model.mlp_dim=64,abc: config.model.mlp_dim needs an integer; 'abc'",
      "e.g. --grid=model.mlp_dim="]),
    ("--grid=model.mlp_dim=64,0", ["--grid=model.mlp_dim=64,0: config.model.mlp_dim=0 is "
                                   "not valid", "e.g. --grid=model.mlp_dim="]),
    ("--seeds=0,-1", ["--seeds=0,-1 holds -1, which is not a valid seed",
                      "Fix: pass seeds in that range, e.g. --seeds=0,1,2."]),
])
def test_study_flag_of_the_wrong_type_names_the_study_flag(tmp_path, flag, phrases):
  proc = _study(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'study'}", flag)
  assert_clean_error(proc, *phrases)
  assert "--config.model.mlp_dim=abc" not in proc.stderr
  assert "--config.seed" not in proc.stderr
  assert not (tmp_path / "study").exists()


# -------------------------------------------------------------------- 3. writes that fail
# A real filesystem that fills: a small tmpfs mounted in a private mount namespace
# (`unshare -m`, root or user namespaces needed; skipped where neither works). Nothing
# is injected: the kernel refuses the writes of orbax, TensorBoard and Python alike.
TINY_RUN = ["--config.model.num_layers=1", "--config.batch_size=16",
            "--config.optimizer.warmup_steps=2", "--config.eval_every=10"]


def _mount_works() -> bool:
  probe = subprocess.run(["unshare", "-m", "sh", "-c",
                          "mount -t tmpfs -o size=64k tmpfs /mnt && touch /mnt/x"],
                         capture_output=True)
  return probe.returncode == 0


needs_mount = pytest.mark.skipif(
    sys.platform != "linux" or not _mount_works(),
    reason="needs `unshare -m` and mount (root) to make a small filesystem that fills")


def _in_private_tmpfs(tmp_path, mount: str, size: str, script: str):
  """Runs the shell `script` with a tmpfs of `size` mounted on `mount`, seen only by
  it; the CLI is `$MAIN`. Returns the completed process (its stdout: the script's)."""
  os.makedirs(mount, exist_ok=True)
  main = f"{sys.executable} -m sparse_jax.main"
  full = (f"mount -t tmpfs -o size={size} tmpfs {mount} || exit 90\n"
          f"MAIN='{main}'\n{script}")
  return subprocess.run(["unshare", "-m", "sh", "-ec", full], capture_output=True,
                        text=True, timeout=900, env=cli_env(), cwd=REPO)


def _step(out, name: str, args: str) -> str:
  """The shell line that runs the CLI with `args`, keeping its exit code and output
  as out/name.rc, .out, .err (the script stops at other failures: sh -e)."""
  return (f"rc=0; $MAIN {args} > {out}/{name}.out 2> {out}/{name}.err || rc=$?; "
          f"echo $rc > {out}/{name}.rc")


def _check_write_error(stderr: str, *phrases: str) -> None:
  """One message, no traceback (of any thread), the last line the fix."""
  assert "Traceback" not in stderr and "AsyncError" not in stderr, stderr[-3000:]
  assert "exception was never retrieved" not in stderr, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert lines[-1].startswith("Fix: "), lines[-3:]
  assert lines[-2].startswith("sparse_jax: error: Writing "), lines[-3:]
  for phrase in phrases:
    assert phrase in stderr, (phrase, stderr[-2000:])


@needs_mount
def test_disk_that_fills_stops_the_run_and_a_rerun_resumes(tmp_path, data_dir, cache_dir):
  """A 1.2 MB disk holds two checkpoints (and the logs), not a third: the run stops at
  the first failed write, and after space is freed the same command resumes."""
  mount = str(tmp_path / "disk")
  args = " ".join([f"--config={DEFAULT_CONFIG}", f"--workdir={mount}/run",
                   f"--config.data_dir={data_dir}",
                   f"--compilation_cache_dir={cache_dir}",
                   "--config.num_steps=40", "--config.checkpoint_every=5",
                   "--config.log_every=5", *TINY_RUN])
  out = tmp_path / "out"
  out.mkdir()
  proc = _in_private_tmpfs(tmp_path, mount, "1200k", f"""
      {_step(out, "first", args)}
      ls {mount}/run/checkpoints > {out}/checkpoints
      mount -o remount,size=20m {mount}
      {_step(out, "second", args)}
      """)
  _skip_unless_the_script_ran(proc)
  first = (out / "first.err").read_text()
  assert (out / "first.rc").read_text().strip() == "1", first[-3000:]
  _check_write_error(first, "failed: no space left on device (",
                     "a checkpoint of this run needs about ",
                     "rerunning the same command resumes from the last complete "
                     "checkpoint, step ", "Fix: free at least ")
  # Nothing between the last progress line and the message, nothing after it.
  lines = first.strip().splitlines()
  last_progress = max(i for i, l in enumerate(lines) if l.startswith("[sparse_jax "))
  assert len(lines) - last_progress == 3, lines[last_progress:]
  resumed = first.split("checkpoint, step ")[1].split(";")[0]
  assert resumed in (out / "checkpoints").read_text().split()
  second = (out / "second.err").read_text()
  assert (out / "second.rc").read_text().strip() == "0", second[-3000:]
  assert f"Resuming from checkpoint at step {resumed}" in second
  assert "Done: eval accuracy" in second


def _args(workdir, data_dir, cache_dir, *extra):
  return " ".join([f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}",
                   f"--config.data_dir={data_dir}",
                   f"--compilation_cache_dir={cache_dir}",
                   *TINY_RUN, *extra])


def _results(out, name):
  """(exit code, stderr) of the script's run `name`."""
  return int((out / f"{name}.rc").read_text()), (out / f"{name}.err").read_text()


def _write_error_of(out, name, *phrases: str) -> str:
  """The stderr of the script's run `name`, checked to have failed (exit 1) with the
  one write-error message holding `phrases`."""
  rc, err = _results(out, name)
  assert rc == 1, err[-3000:]
  _check_write_error(err, *phrases)
  return err


def _skip_unless_the_script_ran(proc) -> None:
  """Skip where the private mount could not be made; else the script itself ran."""
  if proc.returncode == 90:
    pytest.skip("tmpfs mount failed: " + proc.stderr)
  assert proc.returncode == 0, proc.stderr


# Slow (about 60 s): each writer in turn; CI keeps the full disk of a whole run
# (test_disk_that_fills_stops_the_run_and_a_rerun_resumes) and of the study and report.
@pytest.mark.slow
@needs_mount
def test_each_writer_on_a_full_disk(tmp_path, data_dir, cache_dir):
  """config.json, metrics.jsonl, summary.json and the TensorBoard events each meet a
  full disk (files of the workdir linked into a full tmpfs, so that one writer at a
  time fails): each stops the run naming its file; reruns resume and finish."""
  mount, run, out = str(tmp_path / "full"), tmp_path / "run", tmp_path / "out"
  run.mkdir()
  out.mkdir()
  args = _args(run, data_dir, cache_dir, "--config.num_steps=20",
               "--config.checkpoint_every=5", "--config.log_every=5")
  config_args = _args(tmp_path / "run_config", data_dir, cache_dir,
                      "--config.num_steps=20")
  events = tmp_path / "events_disk"
  events_args = _args(f"{events}/run", data_dir, cache_dir, "--config.num_steps=20",
                      "--config.checkpoint_every=5", "--config.log_every=5")
  step = lambda name, a: _step(out, name, a)
  proc = _in_private_tmpfs(tmp_path, mount, "64k", f"""
      touch {mount}/config {mount}/metrics {mount}/summary
      dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null || true  # Fills it.
      mkdir {tmp_path}/run_config
      ln -s {mount}/config {tmp_path}/run_config/config.json.tmp
      {step("config", config_args)}
      ln -s {mount}/metrics {run}/metrics.jsonl
      {step("metrics", args)}
      rm {run}/metrics.jsonl
      ln -s {mount}/summary {run}/summary.json.tmp
      {step("summary", args)}
      rm {run}/summary.json.tmp
      {step("summary_rerun", args)}
      mkdir -p {events} {tmp_path}/elsewhere/checkpoints
      mount -t tmpfs -o size=8k tmpfs {events}
      mkdir {events}/run
      ln -s {tmp_path}/elsewhere/checkpoints {events}/run/checkpoints
      ln -s {tmp_path}/elsewhere/metrics.jsonl {events}/run/metrics.jsonl
      {step("events", events_args)}
      """)
  _skip_unless_the_script_ran(proc)

  full = "failed: no space left on device"
  _write_error_of(out, "config", f"Writing {tmp_path}/run_config/config.json {full}",
                  "rerunning the same command starts from step 0")
  _write_error_of(out, "metrics", f"Writing {run}/metrics.jsonl {full}",
                  "no checkpoint was complete yet, so rerunning the same command "
                  "starts from step 0", "a checkpoint of this run needs about ")
  _write_error_of(out, "summary", f"Writing {run}/summary.json {full}",
                  "resumes from the last complete checkpoint, step 20")
  rc, err = _results(out, "summary_rerun")
  assert rc == 0 and "Done: eval accuracy" in err, err[-3000:]
  assert json.loads((run / "summary.json").read_text())["step"] == 20
  _write_error_of(out, "events", f"Writing {events}/run/events.out.tfevents.", full)


@needs_mount
def test_workdir_made_read_only_or_removed_mid_run(tmp_path, data_dir, cache_dir):
  """A workdir that turns read-only (a read-only bind mount over it: root ignores
  permission bits) or disappears while the run goes on stops the run at its next write
  with the reason; the read-only one resumes once writable again."""
  mount, out = str(tmp_path / "disk"), tmp_path / "out"
  out.mkdir()
  work, gone = f"{mount}/run", f"{mount}/gone"
  args = lambda w: _args(w, data_dir, cache_dir, "--config.num_steps=300",
                         "--config.checkpoint_every=50", "--config.log_every=1",
                         "--config.eval_every=100")
  wait_lines = lambda w, n: (f"until [ -f {w}/metrics.jsonl ] && "
                             f"[ $(wc -l < {w}/metrics.jsonl) -ge {n} ]; "
                             "do sleep 0.1; done")
  proc = _in_private_tmpfs(tmp_path, mount, "20m", f"""
      $MAIN {args(work)} > {out}/ro.out 2> {out}/ro.err &
      PID=$!
      {wait_lines(work, 60)}
      until [ -d {work}/checkpoints/50 ]; do sleep 0.1; done  # Renamed when whole.
      mount --bind -o ro {work} {work}
      rc=0; wait $PID || rc=$?; echo $rc > {out}/ro.rc
      umount {work}
      {_step(out, "rerun", args(work))}
      $MAIN {args(gone)} > {out}/gone.out 2> {out}/gone.err &
      PID=$!
      {wait_lines(gone, 10)}
      rm -rf {gone}
      rc=0; wait $PID || rc=$?; echo $rc > {out}/gone.rc
      """)
  _skip_unless_the_script_ran(proc)
  # Whichever write comes first: metrics.jsonl, or a checkpoint (named by its step).
  err = _write_error_of(out, "ro", f"{work}/", "failed: read-only file system",
                        "resumes from the last complete checkpoint, step ",
                        f"Fix: make {work} writable again")
  resumed = err.split("checkpoint, step ")[1].split(";")[0]
  rc, err = _results(out, "rerun")
  assert rc == 0, err[-3000:]
  assert f"Resuming from checkpoint at step {resumed}" in err and "Done" in err
  _write_error_of(out, "gone", f"{gone}/", "failed: the workdir is gone",
                  f"{gone} no longer exists", "Fix: put the workdir back")


# ----------------------------------------------------------------------------- 4. reports
def _report(*args):
  return subprocess.run([sys.executable, "-m", "sparse_jax.report", *args],
                        capture_output=True, text=True, env=cli_env(), cwd=REPO,
                        timeout=300)


def _finished_run(path, model, dataset, seed, variant="vanilla", finished=True, **extra):
  """A run's files as train_and_evaluate writes them (10 steps, one eval)."""
  path.mkdir(parents=True)
  config = {"seed": seed, "variant": variant, "num_steps": 10, "dataset": dataset,
            "model": {"name": model, **extra}}
  (path / "config.json").write_text(json.dumps(config))
  record = {"step": 5, "train/loss": 2.0, "train/activation_density/mean": 0.4}
  (path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
  if finished:
    (path / "summary.json").write_text(json.dumps({
        "step": 10, "wall_time_s": 3.0, "eval/loss": 1.5, "eval/accuracy": 0.5,
        "eval/activation_density/mean": 0.3 + 0.01 * seed, "config": config}))


def test_report_refuses_unlike_runs_and_a_file_as_out(tmp_path):
  vit, t5 = tmp_path / "vit_study" / "runs", tmp_path / "t5_study" / "runs"
  for seed in (0, 1):
    _finished_run(vit / f"seed_{seed}", "vit", "sklearn_digits", seed, mlp_dim=64)
    _finished_run(t5 / f"seed_{seed}", "t5", "c4/en", seed, d_ff=128)
  out = tmp_path / "report"
  proc = _report(str(vit), str(t5), f"--out={out}")
  assert_clean_error(proc, "The runs are of 2 different experiments",
                     "model.name='vit', dataset='sklearn_digits': 2 run(s)",
                     "model.name='t5', dataset='c4/en': 2 run(s)",
                     "Fix: report each on its own")
  assert not out.exists()  # Nothing written, not even an empty --out.

  existing = tmp_path / "notes.md"
  existing.write_text("mine")
  proc = _report(str(vit), f"--out={existing}")
  assert_clean_error(proc, f"--out={existing} is a file, not a folder",
                     f"e.g. --out={existing}_report")
  assert existing.read_text() == "mine"


def test_report_on_a_dir_that_does_not_exist(tmp_path):
  proc = _report(str(tmp_path / "no_study"), f"--out={tmp_path / 'report'}")
  assert_clean_error(proc, f"{tmp_path / 'no_study'} does not exist",
                     "Fix: pass run workdirs or folders holding them")
  assert not (tmp_path / "report").exists()
  proc = _report(str(tmp_path), f"--out={tmp_path / 'report'}", "--outdir=x")
  assert_clean_error(proc, "Unknown command line flag 'outdir'")  # Not absl's FATAL.


def test_report_names_left_out_runs_and_bounds_file_names(tmp_path):
  """A grid over many long keys (every point differs in all of them) gives figure names
  within the filesystem's 255 bytes; the unfinished run is named on the console."""
  runs = tmp_path / "runs"
  long_keys = {f"a_rather_long_config_key_number_{i}": None for i in range(12)}
  for point in range(2):
    for variant in ("sparsified", "vanilla"):
      for seed in (0, 1):
        _finished_run(runs / f"p{point}" / variant / f"seed_{seed}", "vit",
                      "sklearn_digits", seed, variant,
                      **{k: f"value_{point}" for k in long_keys})
  half = runs / "p0" / "vanilla" / "seed_7"
  _finished_run(half, "vit", "sklearn_digits", 7, finished=False,
                **{k: "value_0" for k in long_keys})
  out = tmp_path / "report"
  proc = _report(str(runs), f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "left out 1 of 9 run(s)" in proc.stderr
  assert (f"{half}: not finished (no summary.json; logged up to step 5 of 10)"
          in proc.stderr)
  figures = json.loads((out / "summary.json").read_text())["figures"]
  assert any(len(f) > 60 for f in figures)  # Named by the grid point, cut short.
  assert all(len(f.encode()) <= 255 and (out / f).exists() for f in figures)
  assert len(set(figures)) == len(figures)


@needs_mount
def test_study_and_report_on_a_full_disk(tmp_path):
  """study.json and a report's files on a full disk: the two-line error naming the
  file; the runs a report reads are not touched."""
  mount, out = str(tmp_path / "full"), tmp_path / "out"
  out.mkdir()
  runs = tmp_path / "runs"
  for seed in (0, 1):
    _finished_run(runs / f"seed_{seed}", "vit", "sklearn_digits", seed)
  study = (f"{sys.executable} -m sparse_jax.study --config={DEFAULT_CONFIG} "
           f"--workdir={mount}/study --seeds=0")
  report = f"{sys.executable} -m sparse_jax.report {runs} --out={mount}/report"
  before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
  proc = _in_private_tmpfs(tmp_path, mount, "16k", f"""
      dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null || true  # Fills it.
      rc=0; {study} > {out}/study.out 2> {out}/study.err || rc=$?
      echo $rc > {out}/study.rc
      rc=0; {report} > {out}/report.out 2> {out}/report.err || rc=$?
      echo $rc > {out}/report.rc
      """)
  _skip_unless_the_script_ran(proc)
  _write_error_of(out, "study", f"Writing {mount}/study/study.json failed: no space left "
                  "on device; no run was started", "Fix: free space on the disk")
  _write_error_of(out, "report", f"Writing {mount}/report",
                  "failed: no space left on device; the runs are untouched")
  assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before


def test_unusable_compilation_cache_is_one_warning(tmp_path):
  """The cache only saves compile time: a run goes on without it, saying so once."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  proc = run_cli(f"--config={DEFAULT_CONFIG}", "--dry_run",
                 f"--compilation_cache_dir={blocker}/cache")
  assert proc.returncode == 0, proc.stderr[-2000:]
  warnings = [l for l in proc.stderr.splitlines() if "compilation" in l.lower()]
  assert warnings == [f"sparse_jax: warning: --compilation_cache_dir={blocker}/cache "
                      "cannot be used (Not a directory); compiling without the cache. "
                      "Pass a writable directory, or '' to turn it off."], warnings


@needs_mount
def test_data_dir_on_a_full_disk(tmp_path):
  """Preparing the dataset into a data_dir whose disk is full names the data_dir and
  how to move it; the workdir was not even created."""
  mount, out, workdir = str(tmp_path / "full"), tmp_path / "out", tmp_path / "run"
  out.mkdir()
  args = " ".join([f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}",
                   f"--config.data_dir={mount}/tfds", "--config.num_steps=10",
                   "--config.optimizer.warmup_steps=2"])
  proc = _in_private_tmpfs(tmp_path, mount, "64k", _step(out, "prepare", args))
  _skip_unless_the_script_ran(proc)
  rc, err = _results(out, "prepare")
  assert rc == 1, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("Fix: free space on the disk of ")
  assert (f"Preparing the dataset in config.data_dir={mount}/tfds failed writing "
          f"{mount}/tfds/") in err
  assert "no space left on device; the run has written nothing yet" in err
  assert "--config.data_dir=<a folder on a disk with room>" in err
  assert not workdir.exists()


# Slow (about 40 s): a study's run on a full disk; CI keeps a single run's
# (test_disk_that_fills_stops_the_run_and_a_rerun_resumes) and the study's own writes.
@pytest.mark.slow
@needs_mount
def test_study_on_a_disk_that_fills_stops_and_resumes(tmp_path, data_dir, cache_dir):
  """A study's run meets the full disk: the study stops with the run's message; once
  there is room, rerunning the study resumes that run and writes the report."""
  mount, out = str(tmp_path / "disk"), tmp_path / "out"
  out.mkdir()
  study = " ".join([f"{sys.executable} -m sparse_jax.study", f"--config={DEFAULT_CONFIG}",
                    f"--workdir={mount}/study", "--variants=vanilla", "--seeds=0",
                    f"--config.data_dir={data_dir}",
                    f"--compilation_cache_dir={cache_dir}",
                    "--config.num_steps=40", "--config.checkpoint_every=5",
                    "--config.log_every=5", *TINY_RUN])
  run = lambda name: (f"rc=0; {study} > {out}/{name}.out 2> {out}/{name}.err || rc=$?; "
                      f"echo $rc > {out}/{name}.rc")
  proc = _in_private_tmpfs(tmp_path, mount, "1200k", f"""
      {run("first")}
      mount -o remount,size=20m {mount}
      {run("second")}
      """)
  _skip_unless_the_script_ran(proc)
  err = _write_error_of(out, "first", f"{mount}/study/runs/base/vanilla/seed_0",
                        "failed: no space left on device (",
                        "rerunning the same command resumes from the last complete "
                        "checkpoint, step ")
  resumed = err.split("checkpoint, step ")[1].split(";")[0]
  rc, err = _results(out, "second")
  assert rc == 0, err[-3000:]
  assert f"Resuming from checkpoint at step {resumed}" in err
  assert (out / "second.out").read_text().strip() == f"{mount}/study/report/report.md"
