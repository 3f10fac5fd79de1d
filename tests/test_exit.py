"""A run's process ends promptly once its work is saved (issue 31).

Two causes of the slow exit, each checked without timing anything (the times are
benchmarks/exit_time.py's): tf.data's autotune thread, which an iterator's deletion can
wait up to 60 s for, is off; and `python -m sparse_jax.main` leaves through
cli.exit_promptly after "Done" and after a preemption, skipping the interpreter's
teardown, but only once nothing is left running that may still write.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

from configs import default
from conftest import DEFAULT_CONFIG, REPO, cli_env, run_cli
from sparse_jax.data import sources

# Imported first by every Python process started with this directory on PYTHONPATH: an
# object whose finalizer reports the interpreter's teardown, which os._exit skips.
TEARDOWN_PROBE = textwrap.dedent("""\
    import sys

    class _TeardownProbe:
      def __del__(self):
        sys.__stderr__.write("INTERPRETER-TEARDOWN\\n")
        sys.__stderr__.flush()

    probe = _TeardownProbe()
    """)


def _probe_env(tmp_path) -> dict[str, str]:
  probe_dir = tmp_path / "probe"
  probe_dir.mkdir(exist_ok=True)
  (probe_dir / "sitecustomize.py").write_text(TEARDOWN_PROBE)
  env = cli_env()
  env["PYTHONPATH"] = str(probe_dir) + ":" + env["PYTHONPATH"]
  return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_tf_data_autotune_is_off():
  options = sources.data_options(default.get_config())
  assert options.autotune.enabled is False
  assert options.deterministic is True


def test_teardown_probe_sees_a_normal_exit(tmp_path):
  # The probe itself works: without exit_promptly the teardown is reported.
  result = _python("print('out')", _probe_env(tmp_path))
  assert result.returncode == 0
  assert "INTERPRETER-TEARDOWN" in result.stderr


def test_exit_promptly_runs_atexit_flushes_and_skips_teardown(tmp_path):
  result = _python("""
      import atexit, logging, sys
      from sparse_jax import cli
      atexit.register(lambda: print("atexit ran"))
      logging.basicConfig(stream=sys.stderr)
      logging.getLogger("x").warning("logged")
      print("buffered", end="")  # No newline: still in stdout's buffer at the exit.
      cli.exit_promptly(3)
      print("not reached")
      """, _probe_env(tmp_path))
  assert result.returncode == 3
  assert result.stdout == "bufferedatexit ran\n"
  assert "logged" in result.stderr
  assert "INTERPRETER-TEARDOWN" not in result.stderr


def test_exit_promptly_returns_while_another_thread_may_write(tmp_path):
  result = _python("""
      import threading, time
      from sparse_jax import cli
      writer = threading.Thread(target=lambda: (time.sleep(0.5), print("written")))
      writer.start()
      cli.exit_promptly(0)
      print("returned")
      """, _probe_env(tmp_path))
  assert result.returncode == 0
  assert result.stdout == "returned\nwritten\n"  # The thread's work was not cut off.
  assert "INTERPRETER-TEARDOWN" in result.stderr


def test_main_exits_promptly_after_preemption_and_after_done(tmp_path, data_dir, cache_dir):
  env = _probe_env(tmp_path)
  workdir = tmp_path / "run"
  args = [f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
          "--config.model.num_layers=1", "--config.num_steps=100", "--config.log_every=5",
          "--config.eval_every=100", "--config.checkpoint_every=100",
          "--config.optimizer.warmup_steps=0"]
  proc = subprocess.Popen([sys.executable, "-m", "sparse_jax.main", *args], env=env,
                          cwd=REPO, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if " | loss " in line:
      proc.send_signal(signal.SIGTERM)  # SIGTERM once training runs; repeats are no-ops.
  proc.wait(timeout=300)
  output = "".join(lines)
  assert proc.returncode == 0, output[-3000:]
  assert "Preempted at step" in output, output[-3000:]
  # Nothing was left running (orbax, the TensorBoard writer): the teardown was skipped.
  assert "INTERPRETER-TEARDOWN" not in output, output[-3000:]

  done = run_cli(*args, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resuming from checkpoint" in done.stderr and "Done:" in done.stderr
  assert "INTERPRETER-TEARDOWN" not in done.stderr, done.stderr[-3000:]
  assert (workdir / "summary.json").exists()


def test_exit_time_benchmark_prints_its_table(tmp_path, data_dir, capsys):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import exit_time  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  out = tmp_path / "rows.json"
  rows = exit_time.main(["--repeats=1", "--steps=10", "--cases=done", f"--json={out}",
                         f"--root={tmp_path}", f"--config.data_dir={data_dir}"])
  assert json.loads(out.read_text()) == rows
  (row,) = rows
  assert row["case"] == "done" and row["n"] == 1
  assert 0 <= row["exit_s"][0] < row["total_s"][0]
  assert "| done | 1 |" in capsys.readouterr().out
