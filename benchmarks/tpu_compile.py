"""The official recipes compiled for Cloud TPU slices here, with no TPU: what fits where.

    python benchmarks/tpu_compile.py [--json out.json] [--models vit,t5]
        [--generations v4,v5e,v5p,v6e] [--variants vanilla,sparsified,sparsified_pallas]
        [--sizes smallest,256] [--programs train_step,...] [--tiles_only]

For each model (ViT-B/16 on ImageNet, T5-Base on C4, at the official global batch),
variant (vanilla; sparsified with the XLA MLP; sparsified with the Pallas kernels) and
TPU generation, it compiles the config's programs with the real TPU compiler
(`sparse_jax.target_compile`, as `--compile_for` does) on the smallest slice that fits,
found by going up in powers of two from one host (the sizes that do not fit are
listed as such), and on a 256-chip slice; and it prints, per slice, the memory per chip,
the compile time of each program and the lower bound on the recipe's time and
chip-hours. A second table says which Pallas tiles compile for each generation at the
two models' per-chip MLP shapes (`--tiles_only` prints only that one; it takes a
minute).

Compiling takes minutes per program on a 2-core CPU (ViT-B/16 about 2, T5-Base more):
the whole default table takes hours. Narrow it with the flags.
"""
import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from sparse_jax import target_compile, tpu
from sparse_jax.errors import ConfigError
from sparse_jax.ops.mlp import MlpKernel, mlp

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
import configs.t5_c4  # pylint: disable=wrong-import-position
import configs.vit_imagenet  # pylint: disable=wrong-import-position

GIB = 2**30
MODELS = {"vit": ("configs/vit_imagenet.py", configs.vit_imagenet.get_config, ""),
          "t5": ("configs/t5_c4.py", configs.t5_c4.get_config, "base,")}
VARIANTS = {"vanilla": ("vanilla", "xla"), "sparsified": ("sparsified", "xla"),
            "sparsified_pallas": ("sparsified", "pallas")}
# Per-chip MLP shapes of the official recipes on 16 chips (ViT: 2048 / 16 images of 197
# tokens; T5: 256 / 16 sequences of 512 encoder tokens): (tokens, d_model, d_ff).
MLP_SHAPES = {"vit_b16": (128 * 197, 768, 3072), "t5_base": (16 * 512, 768, 3072)}
TILES = ((128, 128, 256), (256, 256, 256), (256, 512, 768), (512, 512, 768),
         (1024, 1024, 768), (8, 128, 128))


def config_for(model: str, variant: str):
  path, get_config, prefix = MODELS[model]
  name, impl = VARIANTS[variant]
  config = get_config(prefix + name)
  config.mlp_impl = impl
  return f"{path}:{prefix}{name}" + (" --config.mlp_impl=pallas" if impl == "pallas"
                                      else ""), config


def ladder(generation: tpu.Generation, max_chips: int) -> list[tpu.Topology]:
  """Slices from one host (4 chips) up to `max_chips`, doubling."""
  out, chips = [], 4
  while chips <= max_chips:
    prefix = generation.accelerator_prefix
    out.append(tpu.topology_for_accelerator(f"{prefix}-{chips * generation.cores_per_chip}"))
    chips *= 2
  return out


def compile_row(name: str, config, topology: tpu.Topology, programs) -> dict:
  start = time.time()
  try:
    report = target_compile.compile_for(config, topology, programs, config_name=name)
  except ConfigError as e:
    return {"config": name, "topology": topology.name, "chips": topology.chips,
            "fits": False, "error": str(e).splitlines()[0],
            "seconds": time.time() - start}
  row = target_compile.report_dict(report)
  row["seconds"] = time.time() - start
  row["text"] = target_compile.format_report(report)
  return row


def program_rows(args) -> list[dict]:
  rows = []
  for model in args.models:
    for variant in args.variants:
      name, config = config_for(model, variant)
      for gen_name in args.generations:
        generation = tpu.GENERATIONS[gen_name]
        sizes = ladder(generation, args.max_chips)
        done = set()
        if "smallest" in args.sizes:
          for topology in sizes:
            row = compile_row(name, config, topology, args.programs)
            rows.append(row)
            done.add(topology.chips)
            _print_row(row)
            if row["fits"]:
              break
        for size in (int(s) for s in args.sizes if s != "smallest"):
          topology = next((t for t in sizes if t.chips == size), None)
          if topology is not None and size not in done:
            rows.append(compile_row(name, config, topology, args.programs))
            _print_row(rows[-1])
  return rows


def _print_row(row: dict) -> None:
  print(row.get("text") or f"== {row['config']} on {row['topology']}: {row['error']}",
        flush=True)


def summary_table(rows: list[dict]) -> str:
  head = ("config", "slice", "chips", "mesh", "fits", "largest GiB/chip", "HBM %",
          "compile s (per program)", "step bound ms", "recipe >= h", "chip-h >=")
  lines = [head]
  for r in rows:
    if "programs" not in r:
      lines.append((r["config"], r["topology"], str(r["chips"]), "-", "no", "-", "-",
                    f"{r['seconds']:.0f} total", "-", "-", "-"))
      continue
    largest = max(p["total_bytes"] for p in r["programs"])
    plain = next((p for p in r["programs"] if p["name"] == "train_step"), None)
    recipe = r["recipe_seconds_bound"]
    lines.append((r["config"], f"{r['topology']} ({r['accelerator_type']})",
                  str(r["chips"]), str(tuple(r["mesh_shape"])),
                  "yes" if r["fits"] else "no", f"{largest / GIB:.2f}",
                  f"{100 * largest / r['hbm_bytes']:.0f}",
                  " / ".join(f"{p['compile_seconds']:.0f}" for p in r["programs"]),
                  "-" if plain is None else f"{1e3 * plain['seconds_bound']:.1f}",
                  "-" if recipe is None else f"{recipe / 3600:,.1f}",
                  "-" if recipe is None else f"{recipe / 3600 * r['chips']:,.0f}"))
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  return "\n".join(" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def tile_rows(generations) -> list[dict]:
  """Which tiles compile, forward + backward, bfloat16, at each model's MLP shape."""
  rows = []
  for gen_name in generations:
    devices = tpu.devices(tpu.parse_topology(
        f"{gen_name}:{'x'.join(['2', '2'] + ['1'] * (tpu.GENERATIONS[gen_name].dims - 2))}"))
    for shape_name, (tokens, d_model, d_ff) in MLP_SHAPES.items():
      for tiles in TILES:
        kernel = MlpKernel(impl="pallas", tiles=tiles, platform="tpu")

        def loss(x, w1, w2, kernel=kernel):
          return jnp.sum(mlp(x, w1, None, w2, None, activation="jsrelu", kernel=kernel)
                         .astype(jnp.float32))
        one = jax.sharding.SingleDeviceSharding(devices[0])
        shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=one)
        start = time.time()
        try:
          compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
              shape(tokens, d_model), shape(d_model, d_ff), shape(d_ff, d_model)).compile()
          result = f"{compiled.as_text().count('tpu_custom_call')} Mosaic kernels"
        except Exception as e:  # pylint: disable=broad-except
          first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
          result = "error: " + first[:160]
        rows.append({"generation": gen_name, "shape": shape_name, "tiles": tiles,
                     "result": result, "seconds": time.time() - start})
        print(f"{gen_name} {shape_name} {tiles}: {result} ({rows[-1]['seconds']:.1f} s)",
              flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="also write the rows to this file")
  parser.add_argument("--models", default="vit,t5")
  parser.add_argument("--variants", default="vanilla,sparsified,sparsified_pallas")
  parser.add_argument("--generations", default="v4,v5e,v5p,v6e")
  parser.add_argument("--sizes", default="smallest,256",
                      help="'smallest' (the ladder up to the first fit) and/or chip counts")
  parser.add_argument("--max_chips", type=int, default=256)
  parser.add_argument("--programs", default="",
                      help="comma-separated program names (default: all of the config's)")
  parser.add_argument("--tiles_only", action="store_true")
  parser.add_argument("--no_tiles", action="store_true")
  args = parser.parse_args()
  split = lambda s: tuple(x for x in s.split(",") if x)
  args.models, args.variants = split(args.models), split(args.variants)
  args.generations, args.sizes = split(args.generations), split(args.sizes)
  args.programs = split(args.programs) or None
  bad = [m for m in args.models if m not in MODELS] + [
      v for v in args.variants if v not in VARIANTS] + [
      g for g in args.generations if g not in tpu.GENERATIONS]
  if bad:
    sys.exit(f"tpu_compile.py: unknown {bad}; models {list(MODELS)}, variants "
             f"{list(VARIANTS)}, generations {list(tpu.GENERATIONS)}")
  print(f"jax {jax.__version__}; compiled here (no TPU) with libtpu", flush=True)
  out = {"jax": jax.__version__}
  if not args.tiles_only:
    out["programs"] = program_rows(args)
    print("== summary ==")
    print(summary_table(out["programs"]))
  if not args.no_tiles:
    out["tiles"] = tile_rows(args.generations)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
  main()
