"""Compiling for TPU without a TPU: the Mosaic kernels, the tiny configs' programs on a
v5e:2x2 mesh, `--compile_for` through the CLI, and the checks before any compile.

These run the real TPU compiler (libtpu, installed by the test extra) on this CPU host.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import DEFAULT_CONFIG, REPO, assert_clean_error, cli_env, run_cli
from sparse_jax import host, sharding, target_compile, tpu
from sparse_jax.errors import ConfigError
from sparse_jax.ops.mlp import MlpKernel, mlp

import configs.default
import configs.t5_c4

MOSAIC = 'custom_call_target="tpu_custom_call"'


def _mosaic_calls(compiled) -> int:
  return compiled.as_text().count(MOSAIC)


@pytest.fixture(scope="module")
def v5e_2x2():
  return tpu.devices(tpu.parse_topology("v5e:2x2"))


# ----------------------------------------------------------------------------- topology
def test_topologies_resolve_to_their_chips():
  for name, chips, hosts, accelerator in (("v5e:16x16", 256, 64, "v5litepod-256"),
                                          ("v4:4x4x4", 64, 16, "v4-128"),
                                          ("v5p:4x4x4", 64, 16, "v5p-128"),
                                          ("v6e:8x8", 64, 16, "v6e-64"),
                                          ("v5e:2x4", 8, 1, "v5litepod-8")):
    topology = tpu.parse_topology(name)
    assert (topology.chips, topology.hosts, topology.accelerator_type) == (
        chips, hosts, accelerator)
    assert len(tpu.devices(topology)) == chips
    # gcloud's accelerator type maps back to the same slice.
    assert tpu.topology_for_accelerator(accelerator).shape == topology.shape


def test_default_topologies_of_accelerator_types():
  shapes = {a: tpu.topology_for_accelerator(a).shape for a in (
      "v4-8", "v4-16", "v4-32", "v4-64", "v5p-256", "v5litepod-4", "v5litepod-32",
      "v6e-128")}
  assert shapes == {"v4-8": (2, 2, 1), "v4-16": (2, 2, 2), "v4-32": (2, 2, 4),
                    "v4-64": (2, 4, 4), "v5p-256": (4, 4, 8), "v5litepod-4": (2, 2),
                    "v5litepod-32": (4, 8), "v6e-128": (8, 16)}
  with pytest.raises(ConfigError, match="Fix:"):
    tpu.topology_for_accelerator("v4-12")


@pytest.mark.parametrize("text", ["v5e", "v7q:2x2", "v4:2x2", "v5e:0x4", ""])
def test_bad_topology_names_the_fix(text):
  with pytest.raises(ConfigError, match="Fix: pass a topology such as"):
    tpu.parse_topology(text)


def test_libtpu_rejects_a_layout_with_the_fix():
  with pytest.raises(ConfigError, match="libtpu cannot build the topology v5e:3x3"):
    tpu.devices(tpu.parse_topology("v5e:3x3"))


def test_multislice_mesh_spans_slices_on_the_data_axis():
  topology = tpu.parse_topology("v5e:2x2", num_slices=2)
  mesh = sharding.make_mesh((-1, 1, 2), tpu.devices(topology), num_slices=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # Each tensor pair within a slice; the first half of 'data' on slice 0.
  assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
  with pytest.raises(ConfigError, match="must split over the 2 slices"):
    sharding.make_mesh((1, 4, 2), tpu.devices(topology), num_slices=2)


# ----------------------------------------------------------------------------- kernels
def _mlp_grad_compiled(devices, dtype, tiles, tokens=256, d_model=256, d_ff=512):
  kernel = MlpKernel(impl="pallas", backend="auto", tiles=tiles, platform="tpu")

  def loss(x, w1, b1, w2):
    return jnp.sum(mlp(x, w1, b1, w2, None, activation="jsrelu", kernel=kernel)
                   .astype(jnp.float32) ** 2)

  sharding_ = NamedSharding(jax.make_mesh((1,), ("x",), devices=devices[:1]), P())
  shape = lambda *s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding_)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
      shape(tokens, d_model), shape(d_model, d_ff), shape(d_ff), shape(d_ff, d_model)
  ).compile()


@pytest.mark.parametrize("generation", ["v5e:2x2", "v4:2x2x1"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tiles", [None, (8, 128, 128), (256, 256, 512)])
def test_every_mosaic_kernel_compiles(generation, dtype, tiles):
  devices = tpu.devices(tpu.parse_topology(generation))
  compiled = _mlp_grad_compiled(devices, dtype, tiles)
  # Forward row_sparse_matmul; backward masked_grad_matmul, two col_sparse_matmul
  # (dW2, dW1) and the transposed row_sparse_matmul (dX): five Mosaic kernels.
  assert _mosaic_calls(compiled) == 5
  for name in ("row_sparse_matmul", "col_sparse_matmul", "masked_grad_matmul"):
    assert name in compiled.as_text()


def test_small_token_tiles_fit_scalar_memory_or_stop_before_compiling(v5e_2x2):
  # 3,000 token tiles x 24 unit tiles: as 2D tables Mosaic padded to 128 columns this
  # needed 1.5 MB of the 1 MiB SMEM; flat it takes 0.3 MB and compiles.
  compiled = _mlp_grad_compiled(v5e_2x2, jnp.bfloat16, (8, 128, 128), tokens=24_000,
                                d_model=128, d_ff=3072)
  assert _mosaic_calls(compiled) == 5
  # Four times the tokens do not fit even flat: a ValueError naming the fix, at trace
  # time (no compile).
  with pytest.raises(ValueError, match=r"scalar memory \(SMEM\)[\s\S]*Fix: larger"):
    _mlp_grad_compiled(v5e_2x2, jnp.bfloat16, (8, 128, 128), tokens=96_000,
                       d_model=128, d_ff=3072)


def test_kernel_cost_estimates_count_the_dense_matmuls(v5e_2x2):
  compiled = _mlp_grad_compiled(v5e_2x2, jnp.bfloat16, None, 256, 256, 512)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] >= 6 * 2 * 256 * 256 * 512


def test_a_tile_the_tpu_cannot_take_stops_before_compiling():
  config = configs.default.get_config()
  config.mlp_impl = "pallas"
  config.mlp_tiles = (100, 128, 128)
  with pytest.raises(ConfigError, match=r"\(8, 128\)-aligned[\s\S]*Fix:"):
    target_compile.compile_for(config, tpu.parse_topology("v5e:2x2"))


def test_pallas_follows_the_mesh_platform_not_the_host(v5e_2x2):
  mesh = sharding.make_mesh((4, 1, 1), v5e_2x2)
  kernel = MlpKernel(impl="pallas", mesh=mesh)
  assert jax.default_backend() == "cpu"
  assert kernel.resolved_platform() == "tpu"
  assert kernel.resolved_interpret() is False and kernel.resolved_backend() == "tpu"
  assert MlpKernel(impl="pallas").resolved_interpret() is True  # On this CPU host.


# ----------------------------------------------------------------------------- programs
def _tiny(name: str):
  if name == "vit":
    config = configs.default.get_config()
  else:
    config = configs.t5_c4.get_config("tiny")
  config.mlp_impl = "pallas"
  config.mesh_shape = (2, 1, 2)  # data x tensor: the kernels under shard_map.
  return config


@pytest.mark.parametrize("model", ["vit", "t5"])
def test_tiny_programs_compile_with_mosaic_kernels(model):
  config = _tiny(model)
  topology = tpu.parse_topology("v5e:2x2")
  report = target_compile.compile_for(config, topology, config_name=model)
  names = [p.name for p in report.programs]
  expected = ["train_step", "train_step_metrics", "eval_step"]
  assert names == expected + (["decode"] if model == "t5" else [])
  layers = (config.model.num_layers if model == "vit" else
            config.model.num_encoder_layers + config.model.num_decoder_layers)
  # Five kernels per MLP block in a train step, one (the forward) in the eval step.
  assert report.program("train_step").mosaic_calls == 5 * layers
  assert report.program("eval_step").mosaic_calls == layers
  assert report.fits and report.mesh_shape == (2, 1, 2)
  # Data parallelism reduces gradients across chips.
  assert any(c.kind == "all-reduce" for c in report.program("train_step").collectives)
  assert report.model_flops > 0 and report.six_n_d_flops > 0

  if model == "t5":
    return  # The memory check below, once (it compiles the train step again).
  # The printed numbers are memory_analysis()'s, of the same program compiled again.
  exp = target_compile.train.build_experiment(config, target_compile.target_mesh(
      config, topology))
  memory = target_compile.lowered_programs(exp)["train_step"]().compile().memory_analysis()
  plain = report.program("train_step")
  assert (plain.argument_bytes, plain.temp_bytes, plain.output_bytes, plain.alias_bytes,
          plain.code_bytes) == (memory.argument_size_in_bytes, memory.temp_size_in_bytes,
                                memory.output_size_in_bytes, memory.alias_size_in_bytes,
                                memory.generated_code_size_in_bytes)
  text = target_compile.format_report(report)
  row = next(line for line in text.splitlines() if line.startswith("train_step "))
  assert f"{plain.argument_bytes / 2**30:.3f}" in row.split()
  assert f"{plain.total_bytes / 2**30:.3f}" in row.split()


@pytest.mark.parametrize("model", ["t5_gated", "vit_map"])
def test_public_checkpoint_architectures_compile_for_tpu(model):
  """The model options public checkpoints bring (issue 25): T5 v1.1's gated GELU MLP
  without the output rescale (XLA MLP: the kernels are for plain MLPs), and a ViT with
  a MAP head, compiled with a tensor axis for v5e."""
  if model == "t5_gated":
    config = configs.t5_c4.get_config("tiny")
    config.model.gated_mlp = True
    config.model.output_rescale = False
    config.sparsity.activation = "gelu_tanh"
  else:
    config = configs.default.get_config()
    config.model.classifier = "map"
  config.mesh_shape = (2, 1, 2)
  topology = tpu.parse_topology("v5e:2x2")
  report = target_compile.compile_for(config, topology, programs=("train_step",))
  assert report.fits and report.mesh_shape == (2, 1, 2)
  params = target_compile.train.build_experiment(
      config, target_compile.target_mesh(config, topology)).state_shapes.params
  names = {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  if model == "t5_gated":  # The compiled program holds the gate's second kernel.
    assert any("wi_linear" in n for n in names), sorted(names)
  else:
    assert any("map_head" in n and "probe" in n for n in names), sorted(names)
  train = report.program("train_step")
  assert train.argument_bytes > 0 and train.mosaic_calls == 0
  assert any(c.kind == "all-reduce" for c in train.collectives)


CONFIG_FILES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                      if f.endswith(".py"))
# The small configs (and variants) whose train step CI compiles on every generation's
# smallest slice; ViT-B/16 and T5-Base are benchmarks/tpu_compile.py's (minutes each).
SMALL = [("default", None), ("default", "vanilla"), ("default", "finetune"),
         ("t5_c4", "tiny,sparsified"), ("t5_c4", "tiny,finetune"),
         ("validation_s_shaped", None), ("validation_spectral", None)]


def test_every_config_file_is_compiled_here_or_by_the_benchmark():
  assert {name for name, _ in SMALL} | {"vit_imagenet", "t5_c4"} >= set(CONFIG_FILES)


@pytest.mark.parametrize("name,arg,topology", [
    *[(name, arg, "v5e:2x2") for name, arg in SMALL],
    *[("default", None, t) for t in ("v4:2x2x1", "v5p:2x2x1", "v6e:2x2")],
    *[pytest.param("t5_c4", "tiny", t, marks=pytest.mark.slow)
      for t in ("v4:2x2x1", "v5p:2x2x1", "v6e:2x2")]])
def test_small_configs_train_step_compiles_for_every_generation(name, arg, topology):
  import importlib  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  report = target_compile.compile_for(config, tpu.parse_topology(topology),
                                      programs=("train_step",))
  assert report.fits and report.program("train_step").argument_bytes > 0


def test_batch_shapes_are_what_the_pipeline_yields(data_dir):
  from sparse_jax import tasks  # pylint: disable=import-outside-toplevel
  config = configs.default.get_config()
  config.data_dir = data_dir
  task = tasks.task_for(config)
  pipeline = tasks.data_pipeline(task)
  pipeline.prepare_dataset(config)
  for train, batch in ((True, next(pipeline.train_iterator(config))),
                       (False, next(pipeline.eval_iterator(config)))):
    shapes = task.batch_shapes(config, train)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: (s.shape, np.dtype(s.dtype)) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- analysis
def test_collectives_are_read_from_hlo():
  hlo = "\n".join([
      "  %all-reduce.1 = f32[1024,256]{1,0} all-reduce(f32[1024,256]{1,0} %p), "
      "replica_groups={}",
      "  %ag = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(bf16[8,128] %q)",
      "  %ag.done = bf16[32,128]{1,0} all-gather-done((bf16[8,128], bf16[32,128]) %ag)",
      "  %all-reduce.2 = (f32[], s32[4]{0}) all-reduce(f32[] %a, s32[4]{0} %b)",
      "  %fusion = f32[2] fusion(f32[2] %x), calls=%all-reduce-like",
      "  %rs = bf16[8,128]{1,0:T(8,128)(2,1)} reduce-scatter(bf16[32,128]{1,0} %y)",
  ])
  got = {c.kind: (c.count, c.bytes) for c in target_compile.collectives(hlo)}
  assert got == {"all-reduce": (2, 1024 * 256 * 4 + 4 + 16),
                 "all-gather": (1, 32 * 128 * 2), "reduce-scatter": (1, 8 * 128 * 2)}


def test_matmul_flops_counts_nested_and_scanned_dots():
  def f(x, w):
    y = jnp.dot(x, w)  # 2 * 8 * 16 * 32

    def body(c, _):
      return jnp.dot(c, jnp.ones((32, 32))), None  # 2 * 8 * 32 * 32, 5 times
    y, _ = jax.lax.scan(body, y, None, length=5)
    return jax.jit(lambda a: jnp.einsum("bij,bkj->bik", a, a))(y.reshape(8, 4, 8))
  jaxpr = jax.make_jaxpr(f)(jnp.ones((8, 16)), jnp.ones((16, 32)))
  assert target_compile.matmul_flops(jaxpr) == (2 * 8 * 16 * 32 + 5 * 2 * 8 * 32 * 32
                                                + 2 * 8 * 4 * 4 * 8)


def test_a_real_out_of_memory_compile_is_the_two_line_error():
  # One ViT-B/16 layer at 4,096 images on one v5e chip: the TPU compiler runs out of
  # HBM (in seconds: it fails before optimising).
  proc = run_cli("--config", os.path.join(REPO, "configs", "vit_imagenet.py"),
                 "--compile_for=v5e:1x1", "--config.model.num_layers=1",
                 "--config.batch_size=4096", "--config.eval_batch_size=256")
  assert_clean_error(proc, "The train_step program does not fit in the chip's memory",
                     "GB of HBM are available", "Fix: a larger slice")


def test_tiles_too_large_for_vmem_name_the_fix():
  config = configs.default.get_config()
  config.mlp_impl = "pallas"
  config.mlp_tiles = (1024, 1024, 768)  # 21 MB of blocks in a v4 core's 16 MB of VMEM.
  config.batch_size = 256
  with pytest.raises(target_compile.CompileError,
                     match=r"vector memory \(VMEM\)[\s\S]*Fix: smaller tiles"):
    target_compile.compile_for(config, tpu.parse_topology("v4:2x2x1"),
                               programs=("eval_step",))


def test_does_not_fit_is_a_config_error_with_the_fix():
  g = tpu.GENERATIONS["v5e"]
  big = target_compile.ProgramCost("train_step", 1.0, g.hbm_bytes, 2**30, 0, 2**30, 0,
                                   1.0, 1.0, (), 0)
  report = target_compile.TargetReport("x", tpu.parse_topology("v5e:2x2"), (4, 1, 1), 1,
                                       (big,), 1.0, 1.0, 10, 5)
  assert not report.fits
  with pytest.raises(ConfigError, match=r"does not fit on v5e:2x2[\s\S]*Fix: a larger"):
    target_compile.check_fits(report)
  assert "DOES NOT FIT" in target_compile.format_report(report)


# ----------------------------------------------------------------------------- CLI
def test_cli_compile_for_prints_the_table_and_no_libtpu_chatter(tmp_path):
  env = cli_env()
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  proc = run_cli("--config", DEFAULT_CONFIG, "--compile_for=v5e:2x2",
                 "--config.mlp_impl=pallas", "--config.mesh_shape=(2, 1, 2)",
                 f"--compilation_cache_dir={tmp_path / 'cache'}", env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "compiled for v5e:2x2 (v5litepod-4, 4 chips)" in out
  for program in ("train_step", "train_step_metrics", "eval_step"):
    row = next(line for line in out.splitlines() if line.startswith(program + " "))
    assert int(row.split()[-1]) > 0  # Mosaic kernels in every program.
  assert "fits: largest program" in out and "chip-hours" in out
  for chatter in ("TPU_WORKER_HOSTNAMES", "InitGoogle", "libtpu_lockfile",
                  "TPU_ACCELERATOR_TYPE"):
    assert chatter not in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "workdir").exists()


@pytest.mark.parametrize("args,phrases", [
    (["--compile_for=v5e"], ["not a TPU topology"]),
    (["--compile_for=v5e:2x2", "--dry_run"], ["--compile_for and --dry_run"]),
    (["--compile_slices=2"], ["without --compile_for"]),
    (["--compile_for=v5e:2x2", "--config.mesh_shape=(3, 1, 1)"], ["mesh_shape"]),
    (["--compile_for=v5e:2x2", "--config.batch_size=30"], ["not divisible"]),
])
def test_cli_bad_compile_input_is_a_clean_error(args, phrases):
  proc = run_cli("--config", DEFAULT_CONFIG, *args)
  assert_clean_error(proc, *phrases)


@pytest.mark.parametrize("imports", ["import sparse_jax, jax", "import jax, sparse_jax"])
def test_importing_sparse_jax_keeps_libtpu_quiet_on_a_cpu_host(imports):
  assert host.has_libtpu() and not host.tpu_chips_attached()
  env = {k: v for k, v in cli_env().items()
         if not k.startswith(("TPU_", "JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU"))}
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  # A CPU computation, then a TPU topology and a lowering for it in the same process.
  code = (f"{imports}; import jax.numpy as jnp; from sparse_jax import metrics, tpu; "
          "print(jax.default_backend(), float(jnp.ones(2).sum())); "
          "d = tpu.devices(tpu.parse_topology('v4:2x2x1'))[0]; "
          "s = jax.ShapeDtypeStruct((8, 16), jnp.float32, "
          "sharding=jax.sharding.SingleDeviceSharding(d)); "
          "jax.jit(lambda k: metrics.spectrum(k, 'tpu')).lower(s).compile()")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "cpu 2.0", proc.stderr
  assert proc.stderr == "", proc.stderr


def test_spectral_metrics_use_the_tpu_eigensolver_on_tpu(v5e_2x2):
  one = jax.sharding.SingleDeviceSharding(v5e_2x2[0])
  kernel = jax.ShapeDtypeStruct((96, 384), jnp.float32, sharding=one)
  lowered = jax.jit(lambda k: target_compile.train.metrics.spectral_values(
      k, platform="tpu")).lower(kernel)
  # One Jacobi custom call (seconds to compile) instead of QDWH's HLO (minutes at 768).
  assert lowered.as_text().count("stablehlo.custom_call @Eigh(") == 1
  values = jax.jit(lambda k: target_compile.train.metrics.spectral_values(k))(
      jax.random.normal(jax.random.key(0), (96, 384)))
  assert float(values["w1_frobenius_sq"]) > 0  # The CPU path (eigvalsh) still runs.
