"""`--compile_for`: a config's programs compiled for a TPU slice that is not here.

    python -m sparse_jax.main --config configs/vit_imagenet.py --compile_for=v5e:16x16

builds the train state abstractly on a mesh of the slice's devices (from libtpu's
topology description, `sparse_jax.tpu`), lowers the programs a run executes there (the
train step, plain and with metrics; the eval step; for T5 the decode loop) and compiles
each with the real TPU compiler, Pallas kernels as Mosaic kernels. No data, no workdir,
no TPU. From the compiled programs it reports, per chip: the memory XLA plans
(`memory_analysis`) against the chip's HBM, the FLOPs and HBM bytes XLA counts
(`cost_analysis`), the collectives in the program, and a lower bound on the step time
from the chip's peak numbers (`tpu.GENERATIONS`), with the recipe's time and chip-hours
at that bound. A program that does not fit in HBM is a ConfigError naming the fix.
"""
import collections
import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import config_schema, decoding, sharding, tpu, train
from sparse_jax.errors import ConfigError
from sparse_jax.kernels.tiles import Tiles, default_tiles
from sparse_jax.transforms import lora

GIB, MIB = 2**30, 2**20
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_OPCODE_RE = re.compile(r"(?:^|\s)(?P<op>[a-z][\w-]*)\(")
_ARRAY_RE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)"
                       r"\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  count: int
  bytes: int  # Summed over the ops, per chip (each op's result).


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """One compiled program's per-chip numbers, as the TPU compiler reports them."""
  name: str
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int   # Outputs written into donated arguments (the train state).
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  collectives: tuple[Collective, ...]
  mosaic_calls: int  # Pallas kernels compiled by Mosaic (tpu_custom_call).

  @property
  def total_bytes(self) -> int:
    """HBM the program needs at once: arguments, outputs not aliased to them,
    temporaries and code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def seconds_bound(self, generation: tpu.Generation) -> float:
    """A lower bound on the program's time: its FLOPs at peak bf16 FLOP/s, or its HBM
    traffic at peak bandwidth, whichever is longer (collectives not counted)."""
    return max(self.flops / generation.peak_bf16_flops,
               self.bytes_accessed / generation.hbm_bytes_per_s)


@dataclasses.dataclass(frozen=True)
class TargetReport:
  """What a config needs on a TPU slice."""
  config_name: str
  topology: tpu.Topology
  mesh_shape: tuple[int, ...]
  num_params: int
  programs: tuple[ProgramCost, ...]
  model_flops: float        # Matmul FLOPs of one train step per chip (jaxpr count).
  six_n_d_flops: float      # 6 x parameters x tokens per step, per chip.
  num_steps: int
  log_every: int

  def program(self, name: str) -> ProgramCost:
    return next(p for p in self.programs if p.name == name)

  @property
  def recipe_seconds_bound(self) -> float:
    """The recipe's train steps at the bound: plain steps plus the logging steps."""
    logged = self.num_steps // self.log_every
    plain = self.program("train_step").seconds_bound(self.topology.generation)
    logging = self.program("train_step_metrics").seconds_bound(self.topology.generation)
    return (self.num_steps - logged) * plain + logged * logging

  @property
  def chip_hours_bound(self) -> float:
    return self.recipe_seconds_bound / 3600 * self.topology.chips

  def largest(self) -> ProgramCost:
    return max(self.programs, key=lambda p: p.total_bytes)

  @property
  def fits(self) -> bool:
    return self.largest().total_bytes <= self.topology.generation.hbm_bytes


# ----------------------------------------------------------------------------- analysis
def collectives(hlo_text: str) -> tuple[Collective, ...]:
  """Collective ops of a compiled HLO module: kind, count and result bytes per chip.

  An asynchronous op counts once (its '-start'; for a tuple result the largest array,
  which is the gathered or reduced buffer).
  """
  counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for line in hlo_text.splitlines():
    # '%name = RESULT_SHAPE op(operands), ...': the op is the first call after ' = '.
    # (Layouts such as {1,0:T(8,128)} hold parentheses, but never after a space.)
    _, eq, rest = line.partition(" = ")
    match = _OPCODE_RE.search(rest) if eq else None
    if not match:
      continue
    op = match.group("op")
    start = op.endswith("-start")
    op = op[:-len("-start")] if start else op
    if op not in COLLECTIVES:
      continue
    sizes = [_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY_RE.findall(rest[:match.start()])]
    entry = counts[op]
    entry[0] += 1
    entry[1] += (max(sizes) if start else sum(sizes)) if sizes else 0
  return tuple(Collective(k, c, b) for k, (c, b) in sorted(counts.items()))


def matmul_flops(jaxpr: Any) -> float:
  """FLOPs of the dot_generals of a (closed) jaxpr, nested jaxprs included (a scan's
  body times its length; a while loop's body once)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      # Each output element is a dot over the contracted dimensions of the lhs.
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += (2.0 * math.prod(eqn.outvars[0].aval.shape)
                * math.prod(lhs[d] for d in lhs_contract))
      continue
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += times * matmul_flops(sub)
  return total


def program_cost(name: str, lower: Callable[[], Any]) -> ProgramCost:
  """Lowers (`lower()`) and compiles a program, and reads its per-chip costs."""
  start = time.time()
  try:
    lowered = lower()
  except ValueError as e:  # The kernels' own checks (tiles, SMEM), before compiling.
    raise CompileError(f"The {name} program cannot be built for TPU: "
                       f"{_fix_on_its_line(e)}") from None
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    raise _compile_error(name, e) from None
  seconds = time.time() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  return ProgramCost(
      name=name, compile_seconds=seconds,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      collectives=collectives(text),
      mosaic_calls=text.count('custom_call_target="tpu_custom_call"'))


class CompileError(ConfigError):
  """A program did not compile for the target (out of memory, or a kernel the TPU
  cannot take)."""


def _compile_error(name: str, error: Exception) -> ConfigError:
  text = str(error)
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  if "vmem" in text.lower():  # A Pallas kernel's blocks overflow the core's VMEM.
    used = re.search(r"Used ([\d.]+\w?) of ([\d.]+\w?) vmem", text)
    detail = f" ({used.group(1)}B of {used.group(2)}B)" if used else ""
    return CompileError(
        f"The {name} program's Pallas MLP kernels need more vector memory (VMEM) than a "
        f"TPU core has{detail}: their tiles are too large.\nFix: smaller tiles, e.g. "
        "--config.mlp_tiles='(512, 512, 768)' (docs/pods.md lists those that compile).")
  if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
    needed = re.search(r"required for ([\w ]+?) \(([\d.]+\w?)\) exceeds available "
                       r"(\w+) \(([\d.]+\w?)\)", text)
    used = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) (\w+)", text)
    detail = (f": its {needed.group(1)} need {needed.group(2)}B per chip, "
              f"{needed.group(4)}B of {needed.group(3)} are available" if needed else
              f" (used {used.group(1)} of {used.group(2)} {used.group(3)})" if used else "")
    return CompileError(f"The {name} program does not fit in the chip's memory{detail}."
                        "\n" + _FIT_FIX)
  return CompileError(f"The TPU compiler rejected the {name} program: {first[:400]}\n"
                      "Fix: if it names a Pallas kernel, pass other tiles "
                      "(--config.mlp_tiles, see docs/pods.md for those that compile) or "
                      "--config.mlp_impl=xla.")


_FIT_FIX = ("Fix: a larger slice (--compile_for with more chips), fewer examples per chip "
            "(--config.batch_size), sharding the state over chips "
            "(--config.mesh_shape='(-1, 4, 1)' for FSDP over groups of 4), or bfloat16 "
            "activations (--config.model.dtype=bfloat16).")


# ----------------------------------------------------------------------------- programs
def target_mesh(config: ml_collections.ConfigDict, topology: tpu.Topology
                ) -> jax.sharding.Mesh:
  """The config's mesh over the slice's devices (the data axis spans the slices)."""
  return sharding.make_mesh(config.mesh_shape, tpu.devices(topology),
                            num_slices=topology.num_slices)


def check_kernel_tiles(config: ml_collections.ConfigDict) -> None:
  """Pallas tiles a TPU cannot take stop here, before compiling, with the fix."""
  if config.get("mlp_impl", "xla") != "pallas" or config.get("mlp_backend") == "gpu":
    return
  tiles = config.get("mlp_tiles")
  try:
    (Tiles(*tiles) if tiles else default_tiles("tpu")).validate("tpu")
  except ValueError as e:
    raise ConfigError(_fix_on_its_line(e)) from None


def _fix_on_its_line(error: ValueError) -> str:
  """The kernels' one-line ValueErrors as the CLI's two lines (problem, then 'Fix:')."""
  return str(error).replace(" Fix:", "\nFix:")


def lowered_programs(exp: train.Experiment) -> dict[str, Callable[[], Any]]:
  """Name -> a thunk lowering that program with abstract, sharded arguments."""
  config, task = exp.config, exp.task
  state = ckpt_lib.abstract_with_shardings(exp.state_shapes, exp.state_shardings)
  batch_sharding = sharding.batch_sharding(exp.mesh)

  def batch(train_batch: bool):
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding)
            for k, s in task.batch_shapes(config, train_batch).items()}

  step = jax.ShapeDtypeStruct((), np.int32, sharding=sharding.replicated(exp.mesh))
  programs = {
      "train_step": lambda: train.make_train_step(exp, with_metrics=False).lower(
          state, batch(True)),
      "train_step_metrics": lambda: train.make_train_step(exp, with_metrics=True).lower(
          state, batch(True)),
      "eval_step": lambda: train.make_eval_step(exp).lower(state.params, step,
                                                           batch(False)),
  }
  if config.model.name == "t5":
    programs["decode"] = lambda: _decode(exp, state.params, batch(False))
  return programs


def _decode(exp: train.Experiment, params: Any, batch: dict[str, Any]) -> Any:
  """The greedy decode loop (encoder, then one token per step) of an eval batch."""
  settings = decoding.DecodeSettings(max_decode_length=exp.config.text.targets_length,
                                     stop_at_eos=False)
  model = exp.model

  def generate(params, encoder_tokens):
    params = lora.merge(params)
    return decoding.finish(model, params, decoding.start(
        model, params, encoder_tokens, settings), settings).tokens

  return jax.jit(generate, out_shardings=sharding.batch_sharding(exp.mesh)).lower(
      params, batch["encoder_input_tokens"])


def analytic_flops(exp: train.Experiment) -> tuple[float, float]:
  """Per chip and train step: (matmul FLOPs of the traced step, 6 x params x tokens).

  The first counts every dot_general of the plain train step's jaxpr with the MLP as
  plain jnp (`mlp_impl='xla'`, the kernels' dense equivalent): forward, backward and
  attention. The second is the usual estimate, tokens being the batch's positions
  (ViT patches + class token; T5 encoder + decoder tokens; one per example for the
  residual MLP).
  """
  config = exp.config
  dense = ml_collections.ConfigDict(config.to_dict())
  dense.mlp_impl = "xla"
  dense_exp = train.build_experiment(dense, exp.mesh)
  step = train.make_train_step(dense_exp, with_metrics=False)
  state = ckpt_lib.abstract_with_shardings(dense_exp.state_shapes,
                                           dense_exp.state_shardings)
  batch = exp.task.batch_shapes(config, True)
  flops = matmul_flops(jax.make_jaxpr(step)(state, batch))
  if config.model.name == "t5":
    tokens = config.batch_size * (config.text.inputs_length + config.text.targets_length)
  elif config.model.name == "vit":
    tokens = config.batch_size * ((config.image_size // config.model.patch_size) ** 2 + 1)
  else:  # The residual MLP: one token, the flattened image, per example.
    tokens = config.batch_size
  chips = exp.mesh.size
  return flops / chips, 6.0 * exp.num_params * tokens / chips


def compile_for(config: ml_collections.ConfigDict, topology: tpu.Topology,
                programs: tuple[str, ...] | None = None,
                config_name: str = "",
                progress: Callable[[str], None] = lambda message: None) -> TargetReport:
  """Compiles the config's programs for `topology` and reports their costs per chip.

  Args:
    config: the experiment config (validated here).
    topology: the slice (see `tpu.parse_topology`).
    programs: names from `lowered_programs` to compile (None = all).
    config_name: how to name the config in the report.
    progress: called with a line before and after each compile (they take minutes
      for the official configs).

  Raises:
    ConfigError: bad config, a mesh or batch the slice cannot take, tiles a TPU cannot
      take, or a program the compiler rejects (CompileError), each with its fix.
  """
  config_schema.validate(config)
  check_kernel_tiles(config)
  mesh = target_mesh(config, topology)
  train.check_batch_sizes(config, mesh, process_count=topology.hosts)
  exp = train.build_experiment(config, mesh)
  thunks = lowered_programs(exp)
  names = tuple(thunks) if programs is None else programs
  unknown = [n for n in names if n not in thunks]
  if unknown:
    raise ConfigError(f"Unknown program(s) {unknown}; this config has {list(thunks)}.\n"
                      f"Fix: pass some of {', '.join(thunks)}.")
  costs = []
  for name in names:
    progress(f"Compiling {name} for {topology.name} (mesh {dict(mesh.shape)}) ...")
    costs.append(program_cost(name, thunks[name]))
    progress(f"Compiled {name} in {costs[-1].compile_seconds:.1f} s.")
  costs = tuple(costs)
  model_flops, six_n_d = analytic_flops(exp)
  return TargetReport(config_name, topology, tuple(int(s) for s in mesh.devices.shape),
                      exp.num_params, costs, model_flops, six_n_d,
                      int(config.num_steps), int(config.log_every))


def check_fits(report: TargetReport) -> None:
  """ConfigError when a program needs more HBM per chip than the chip has."""
  if report.fits:
    return
  worst, g = report.largest(), report.topology.generation
  raise ConfigError(
      f"{report.config_name or 'The config'} does not fit on {report.topology}: its "
      f"{worst.name} needs {worst.total_bytes / GIB:.2f} GiB per chip (arguments "
      f"{worst.argument_bytes / GIB:.2f}, temporaries {worst.temp_bytes / GIB:.2f}), "
      f"over the {g.hbm_bytes / GIB:.0f} GiB of HBM of a {g.name} chip.\n" + _FIT_FIX)


# ----------------------------------------------------------------------------- report
def _table(rows: list[tuple[str, ...]]) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths))) for r in rows]


def _duration(seconds: float) -> str:
  if seconds >= 3600:
    return f"{seconds / 3600:,.1f} h"
  return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def format_report(report: TargetReport) -> str:
  """The table `--compile_for` prints."""
  t, g = report.topology, report.topology.generation
  head = [f"== {report.config_name or 'config'} compiled for {t} ==",
          f"mesh (data, fsdp, tensor) {report.mesh_shape} over {t.chips} chips, "
          f"{t.hosts} host(s); {report.num_params:,} parameters; {g.name} chip: "
          f"{g.hbm_bytes / GIB:.0f} GiB HBM, {g.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{g.hbm_bytes_per_s / 1e9:.0f} GB/s"]
  rows = [("program", "compile s", "args GiB", "temp GiB", "out GiB", "aliased GiB",
           "code MiB", "total GiB", "HBM %", "margin GiB", "GFLOP/chip", "bound ms",
           "Mosaic")]
  for p in report.programs:
    rows.append((p.name, f"{p.compile_seconds:.1f}", f"{p.argument_bytes / GIB:.3f}",
                 f"{p.temp_bytes / GIB:.3f}", f"{p.output_bytes / GIB:.3f}",
                 f"{p.alias_bytes / GIB:.3f}", f"{p.code_bytes / MIB:.1f}",
                 f"{p.total_bytes / GIB:.3f}", f"{100 * p.total_bytes / g.hbm_bytes:.1f}",
                 f"{(g.hbm_bytes - p.total_bytes) / GIB:.2f}", f"{p.flops / 1e9:,.2f}",
                 f"{1e3 * p.seconds_bound(g):.2f}", str(p.mosaic_calls)))
  coll = [("program", "collective", "count", "MiB per chip")]
  for p in report.programs:
    for c in p.collectives:
      coll.append((p.name, c.kind, str(c.count), f"{c.bytes / MIB:,.1f}"))
  lines = head + _table(rows)
  lines += ["== collectives =="] + (_table(coll) if len(coll) > 1 else ["none"])
  names = {p.name for p in report.programs}
  lines.append("== FLOPs and time per train step, per chip ==")
  lines.append(f"model matmul FLOPs (jaxpr, dense MLP): {report.model_flops / 1e9:,.2f} G; "
               f"6 x params x tokens: {report.six_n_d_flops / 1e9:,.2f} G")
  if "train_step" in names:
    plain = report.program("train_step")
    lines.append(f"compiler's count of the train step: {plain.flops / 1e9:,.2f} G "
                 f"(Pallas kernels counted dense, from their cost estimates)")
  if {"train_step", "train_step_metrics"} <= names:
    lines.append(
        f"lower bound (peak FLOP/s or HBM bandwidth, collectives and input not counted): "
        f"{1e3 * report.program('train_step').seconds_bound(g):.2f} ms per step; the "
        f"recipe's {report.num_steps:,} steps >= {_duration(report.recipe_seconds_bound)}, "
        f">= {report.chip_hours_bound:,.3g} chip-hours on {t.chips} chips")
  fits = report.largest()
  lines.append(("fits" if report.fits else "DOES NOT FIT") +
               f": largest program {fits.name} {fits.total_bytes / GIB:.2f} GiB of "
               f"{g.hbm_bytes / GIB:.0f} GiB per chip")
  lines.append(f"peak numbers: {g.source}")
  return "\n".join(lines)


def report_dict(report: TargetReport) -> dict[str, Any]:
  """The report as JSON-able values (benchmarks/tpu_compile.py --json)."""
  g = report.topology.generation
  return {
      "config": report.config_name, "topology": report.topology.name,
      "num_slices": report.topology.num_slices, "chips": report.topology.chips,
      "accelerator_type": report.topology.accelerator_type,
      "mesh_shape": list(report.mesh_shape), "num_params": report.num_params,
      "hbm_bytes": g.hbm_bytes, "fits": report.fits,
      "model_flops_per_chip": report.model_flops,
      "six_n_d_flops_per_chip": report.six_n_d_flops,
      "recipe_seconds_bound": (report.recipe_seconds_bound
                               if {"train_step", "train_step_metrics"}
                               <= {p.name for p in report.programs} else None),
      "programs": [dict(dataclasses.asdict(p), total_bytes=p.total_bytes,
                        seconds_bound=p.seconds_bound(g)) for p in report.programs],
  }
