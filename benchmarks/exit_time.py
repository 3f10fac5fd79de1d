"""How long `python -m sparse_jax.main` takes to exit once its work is done.

  python benchmarks/exit_time.py                    # 3 runs of each case, a table
  python benchmarks/exit_time.py --repeats 5 --json /tmp/exit_time.json
  python benchmarks/exit_time.py --source /tmp/old_checkout   # another checkout's code

Flags it does not know (`--config.data_dir=DIR`, ...) are passed on to every run.

Two cases, each a fresh run of `--config` for `--steps` steps in a new workdir (under
`--root`, a temporary directory by default):

- `done`: the run trains to the end; measured from the moment its "Done: ..." line
  arrives to the moment the process has exited.
- `sigterm`: the run gets SIGTERM (what a preempted VM or `kill` sends) at its first
  progress line at or after half the steps; measured from its "Preempted at step ..."
  line to the exit.

Lines are timestamped as the parent reads them from the child's stderr, so both ends of
an interval are seen the same way. Prints a markdown table (mean +- sd over the
repeats, with the min and max). The runs must last a while to show what they would
after a real run: tf.data's autotune thread doubles its sleep up to 60 s, and a
deleted iterator could wait that sleep out (issue 31); 4,000 steps of the default
config train for about a minute on 2 CPU cores.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("done", "sigterm")


def _run_command(args, workdir: str, cache_dir: str) -> list[str]:
  """Command line of one run: a progress line every 1/20 of the steps, one eval and
  one checkpoint at the end, and the flags this script does not know (e.g.
  --config.data_dir=DIR)."""
  return [sys.executable, "-m", "sparse_jax.main", f"--config={args.config}",
          f"--workdir={workdir}", f"--compilation_cache_dir={cache_dir}",
          f"--config.num_steps={args.steps}",
          f"--config.log_every={max(1, args.steps // 20)}",
          f"--config.eval_every={args.steps}", f"--config.checkpoint_every={args.steps}",
          "--config.optimizer.warmup_steps=0", *args.run_flags]


def time_exit(command: list[str], case: str, env: dict[str, str], cwd: str,
              sigterm_at: int = 0, timeout: float = 900.0) -> dict[str, float]:
  """Runs `command`; returns seconds from its last work line ("Done" or, after a
  SIGTERM sent at the first progress line of a step >= `sigterm_at`, "Preempted") to
  its exit, and its total wall time."""
  start = time.monotonic()
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=cwd)
  # A watchdog, so a hung child fails the benchmark instead of hanging it.
  watchdog = threading.Timer(timeout, proc.kill)
  watchdog.start()
  marker = "Done:" if case == "done" else "Preempted at step"
  seen, tail = None, []
  try:
    for line in proc.stderr:
      tail = (tail + [line])[-20:]
      if seen is None and marker in line:
        seen = time.monotonic()
      step = re.search(r"\] step (\d+)/", line)
      if case == "sigterm" and step and int(step.group(1)) >= sigterm_at:
        proc.send_signal(signal.SIGTERM)  # Several sends are harmless: one event.
    proc.wait()
  finally:
    watchdog.cancel()
  end = time.monotonic()
  if proc.returncode != 0 or seen is None:
    raise RuntimeError(f"{case} run failed (exit {proc.returncode}, no {marker!r} line):\n"
                       + "".join(tail))
  return {"exit_s": end - seen, "total_s": end - start}


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--config", default="configs/default.py",
                      help="Config of the runs (relative to --source).")
  parser.add_argument("--steps", type=int, default=4000, help="Steps of each run.")
  parser.add_argument("--cases", default=",".join(CASES), help="Comma-separated: "
                      f"which of {', '.join(CASES)} to time.")
  parser.add_argument("--source", default=REPO, help="Checkout whose sparse_jax runs "
                      "(e.g. a `git worktree` of an older commit, to compare).")
  parser.add_argument("--root", help="Directory for the workdirs (default: a new "
                      "temporary directory, removed afterwards).")
  parser.add_argument("--json", help="Also write the rows to this JSON file.")
  args, args.run_flags = parser.parse_known_args(argv)
  cases = args.cases.split(",")
  if set(cases) - set(CASES):
    parser.error(f"--cases: unknown {sorted(set(cases) - set(CASES))}")
  env = dict(os.environ, PYTHONPATH=args.source + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  with tempfile.TemporaryDirectory(dir=args.root) as root:
    rows = []
    for case in cases:
      times = [time_exit(_run_command(args, os.path.join(root, f"{case}_{i}"),
                                      os.path.join(root, "xla_cache")),
                         case, env, args.source, sigterm_at=args.steps // 2)
               for i in range(args.repeats)]
      exits = [t["exit_s"] for t in times]
      rows.append({"case": case, "n": len(exits), "exit_s": exits,
                   "mean_s": statistics.mean(exits),
                   "sd_s": statistics.stdev(exits) if len(exits) > 1 else None,
                   "total_s": [t["total_s"] for t in times]})
  cpu = _cpu_name()
  print(f"{args.config}, {args.steps} steps, {args.repeats} runs per case; "
        f"{os.cpu_count()} cores, {cpu}; source {args.source}\n")
  print("| case | runs | exit after the last line: mean +- sd | min - max | "
        "whole run, mean |")
  print("| --- | --- | --- | --- | --- |")
  for r in rows:
    sd = "-" if r["sd_s"] is None else f"{r['sd_s']:.2f}"
    print(f"| {r['case']} | {r['n']} | {r['mean_s']:.2f} +- {sd} s | "
          f"{min(r['exit_s']):.2f} - {max(r['exit_s']):.2f} s | "
          f"{statistics.mean(r['total_s']):.1f} s |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def _cpu_name() -> str:
  """The CPU's model name (Linux), for the table's header."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


if __name__ == "__main__":
  main()
