r"""Compile postrl's decode program for an H100 on a machine without a GPU, and report what XLA made
of one decode step: the operations it launches and the bytes they write.

    pip install "jax-cuda13-plugin==$(python -c 'import jax; print(jax.__version__)')" \
        "jax-cuda13-pjrt==$(python -c 'import jax; print(jax.__version__)')"
    JAX_PLATFORMS=cpu python benchmarks/xla_gpu_offline.py --config smollm2-135m llama-1b \
        --batch 1 2 16 --decode-attention xla pallas --out /tmp/offline.json --dump-dir /tmp/hlo

Install the plugin in a virtual environment of its own (with postrl's dependencies and
``PYTHONPATH`` at the repository): beside the test environment it prints a plugin error at every
``import jax`` that has no ``JAX_PLATFORMS=cpu``, which is why it is not a test dependency. The
counts in docs/benchmarks.md used jax / jaxlib / jax-cuda13-pjrt 0.11.2 and flax 0.12.10 on
Python 3.12, the versions of the lent GPUs' image.

How: JAX's deviceless ahead-of-time compilation (``jax.experimental.topologies.get_topology_desc``
with ``platform="cuda"`` and a target description of the GPU: ``target_config``) gives a
compile-only CUDA device. The program is ``benchmarks/generate.py``'s ``decode_step_hlo`` (the
jitted body of ``postrl.sampling.generate`` with the arguments ``generate`` gives it on one GPU),
lowered with abstract parameters (``jax.ShapeDtypeStruct`` on that device: no weights are made),
then compiled by the CUDA plugin's XLA: the same HLO passes, fusion decisions and Triton
lowering of the Pallas kernels as on the GPU. The library's platform checks read
``jax.default_backend()``; while lowering it answers "gpu" here, so the program is the one a
one-GPU run builds (decode-attention kernel, sampling kernel, bits per pass, rows decoded).

``--train sft dpo`` compiles the training step instead (``benchmarks/train_step.py``'s job:
``postrl.trainers.step.make_train_step`` around the trainers' loss functions, the state from
``postrl.trainers.loop.abstract_state``, cuDNN or XLA attention, ``--seq`` x ``--rows``) and
summarises the whole program: launches and bytes written by kind, and the largest writers by
source line. No cuDNN library is needed: the cuDNN version check answers 9.10 while lowering
(``pretend_cudnn``) and XLA emits the cuDNN custom calls without building their graphs.

``--sampler top_p top_k min_p`` compiles ``kernels.sampling.sample_gpu`` alone at each ``--batch``
x ``--vocab`` (its default settings) with the one-launch finish (``GpuConfig.fused_finish``), with
XLA's, and (cdf draw) with ``grid_combine``, and reports the launches of each.

``--mosaic-qmm`` compiles ``kernels.quantized_matmul.mosaic`` (the Mosaic GPU quantized matmul)
at each ``--qmm-m`` on ``--qmm-shape`` for int8 per channel and int4 group 128, at its default
tiling and each ``MOSAIC_VARIANTS`` change, and reports what ptxas reports for the kernel
(registers per thread, spill bytes) with the shared memory it reserves and the instruction mix
of its K loop in PTX. Mosaic GPU's whole compiler runs in a deviceless compile (its Python
lowering, its MLIR passes to PTX, ptxas); ``MOSAIC_GPU_DUMP_PTX`` / ``MOSAIC_GPU_DUMP_PTXAS`` /
``MOSAIC_GPU_DUMP_TO`` make it write them, one set of files per kernel.

What it tells and what it does not: the per-step launch count and the kind of every launched
operation (``common.loop_launch_list``) -- on 2026-11-27 this reproduced exactly the 749 launches
per step that the H100 run of 2026-11-26 counted from its own compiled program (SmolLM2-135M
shape, batch 1, top-p 1.0, XLA attention) -- and the bytes each launched operation writes (its
output's size; in-place cache updates, whose output is the whole cache but which write one slot,
are left out and counted apart). It cannot autotune (no GPU to time candidates), so GEMM tilings,
split-K choices and cuBLAS-vs-Triton picks may differ from a GPU compile; and it times nothing.
Times come only from the ``benchmarks/*.py`` device runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
  sys.path.insert(0, ROOT)

from benchmarks import common  # pylint: disable=wrong-import-position

# The H100 SXM5 (80 GB HBM3) as XLA's GPU compiler sees it: NVIDIA's datasheet and CUDA's
# device-query figures (compute capability 9.0, 132 SMs, 50 MiB L2, 228 KiB shared memory per SM
# of which 227 KiB per block when opted in, 48 KiB by default, 64K 32-bit registers per SM and
# per block, 2048 threads per SM, 1.98 GHz boost clock, 3.35 TB/s HBM3).
H100 = dict(
    threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
    shared_memory_per_core=228 * 1024, shared_memory_per_block_optin=227 * 1024,
    threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
    block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
    memory_bandwidth=3_352_320_000_000, l2_cache_size=50 * 2**20, clock_rate_ghz=1.98,
    device_memory_size=80 * 10**9, registers_per_core_limit=65536,
    registers_per_block_limit=65536)
GPUS = {"h100": (H100, (9, 0), "NVIDIA H100 80GB HBM3")}
FORMATS = ("bf16", "int8", "int4_g128")  # as benchmarks/decode.py


def target_config(gpu: str = "h100") -> str:
  """The ``GpuTargetConfigProto`` text of ``gpu`` (``GPUS``) that deviceless compilation takes."""
  info, (major, minor), name = GPUS[gpu]
  fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
  return (f"gpu_device_info {{\n{fields}\n"
          f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
          f'platform_name: "CUDA"\n'
          f"dnn_version_info {{ major: 9 minor: 10 patch: 0 }}\n"
          f'device_description_str: "{name}"\n')


def compile_only_sharding(gpu: str = "h100"):
  """A replicated ``NamedSharding`` on one compile-only CUDA device described by ``gpu``."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(gpu),
                                            topology="1x1x1")
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(
        "xla_gpu_offline: no compile-only CUDA device (" + str(e).splitlines()[0][:200] + "). "
        "It needs the CUDA plugin of this JAX version: pip install "
        f"jax-cuda13-plugin=={jax.__version__} jax-cuda13-pjrt=={jax.__version__}, and "
        "JAX_PLATFORMS=cpu") from None
  mesh = topologies.make_mesh(topo=topology, mesh_shape=(1,), axis_names=("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


@contextlib.contextmanager
def backend_reads_gpu(sharding):
  """Inside, ``jax.default_backend()`` answers "gpu" (the library's platform checks read it) and
  the default device is ``sharding``'s compile-only one (Pallas's Triton lowering reads the GPU
  generation from it)."""
  import jax  # pylint: disable=import-outside-toplevel
  real = jax.default_backend
  jax.default_backend = lambda: "gpu"
  try:
    with jax.default_device(next(iter(sharding.device_set))):
      yield
  finally:
    jax.default_backend = real


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_IN_PLACE = ("dynamic-update-slice", "scatter")


def _launches_and_bytes(e: dict) -> tuple[int, int]:
  """(launches, bytes written) of one ``loop_launch_list`` entry. An asynchronous pair
  (``fusion-start`` / ``fusion-done``, ``all-gather-start`` / ...) is one launch: the start's
  output tuple holds its operands, so its bytes come from the done's output, which is no launch."""
  if e["key"].endswith("-start"):
    return e["count"], 0
  if e["key"].endswith("-done"):
    return 0, shape_bytes(e["shape"]) * e["count"]
  return e["count"], shape_bytes(e["shape"]) * e["count"]


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string such as ``bf16[576,192]`` or ``(f32[2], s32[2])``."""
  total = 0
  for dtype, dims in re.findall(r"([a-z][a-z0-9]*)\[([0-9,]*)\]", shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def step_summary(hlo_text: str) -> dict:
  """Launches and written bytes of one iteration of ``hlo_text``'s main loop.

  ``bytes_written``: the outputs of the launched operations, times their launches per step;
  those that update a buffer in place (a fused ``dynamic-update-slice`` / ``scatter``, e.g. the
  KV cache write, whose output shape is the whole buffer) are left out and their number given as
  ``in_place_updates``. ``largest``: the five launched operations writing the most bytes per step
  (kind, output shape, source, bytes x launches)."""
  entries = common.loop_launch_list(hlo_text)
  counted, in_place = [], 0
  for e in entries:
    if not e["count"]:
      continue
    if any(op in e["fused"] or op.replace("-", "_") in e["name"] for op in _IN_PLACE) or (
        e["key"] in _IN_PLACE):
      in_place += e["count"]
      continue
    counted.append((_launches_and_bytes(e)[1], e))
  counted.sort(key=lambda be: -be[0])
  by_kind = {}
  for e in entries:
    by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + e["count"]
  return dict(launches=sum(e["count"] for e in entries),
              by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
              bytes_written=sum(b for b, _ in counted), in_place_updates=in_place,
              largest=[dict(kind=e["kind"], shape=e["shape"], source=e["source"],
                            launches=e["count"], bytes=b) for b, e in counted[:5]])


def _walk_program(hlo_text: str) -> list[dict]:
  """Every launched instruction of the ENTRY computation (``common._launch`` entries): a while
  body counted its known trip count times, a call's callee once, a conditional's largest branch."""
  comps, entry = common._computations(hlo_text)  # pylint: disable=protected-access
  frames = common._stack_frames(hlo_text)  # pylint: disable=protected-access

  def visit(name, scale, where):
    total = []
    for opcode, rest, inst, shape in comps.get(name, ()):
      if opcode == "while":
        trip = re.search(r'known_trip_count"?:\{"n":"(\d+)"', rest)
        body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
        total += visit(body, scale * (int(trip.group(1)) if trip else 1), where + [inst])
      elif opcode == "call" and re.search(r"to_apply=%?([\w.\-]+)", rest):
        total += visit(re.search(r"to_apply=%?([\w.\-]+)", rest).group(1), scale, where)
      elif opcode == "conditional":
        branches = re.findall(r"%?([\w.\-]+)", rest.split("branch_computations={", 1)[1]
                              .split("}", 1)[0]) if "branch_computations={" in rest else re.findall(
                                  r"(?:true|false)_computation=%?([\w.\-]+)", rest)
        runs = [visit(b, scale, where + [inst]) for b in branches]
        total += max(runs, key=lambda r: sum(e["count"] for e in r), default=[])
      elif opcode not in common._NO_LAUNCH:  # pylint: disable=protected-access
        total.append(common._launch(comps, frames, opcode, rest, inst, shape, scale,  # pylint: disable=protected-access
                                    where))
    return total

  return visit(entry, 1, [])


def program_summary(hlo_text: str, top: int = 12) -> dict:
  """Launches and bytes written (output sizes x launches) of a whole compiled program, by kind,
  and its ``top`` largest writers grouped by (kind, source line, fused ops); an asynchronous
  start / done pair is one launch (``_launches_and_bytes``)."""
  entries = _walk_program(hlo_text)
  by_kind, writers = {}, {}
  total = 0
  for e in entries:
    launches, nbytes = _launches_and_bytes(e)
    total += launches
    kind = by_kind.setdefault(e["kind"], dict(launches=0, bytes=0))
    kind["launches"] += launches
    kind["bytes"] += nbytes
    key = (e["kind"], e["source"], e["fused"])
    w = writers.setdefault(key, dict(kind=e["kind"], source=e["source"], fused=e["fused"],
                                     launches=0, bytes=0))
    w["launches"] += launches
    w["bytes"] += nbytes
  return dict(launches=total,
              bytes_written=sum(k["bytes"] for k in by_kind.values()),
              by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"])),
              largest=sorted(writers.values(), key=lambda w: -w["bytes"])[:top])


@contextlib.contextmanager
def pretend_cudnn(version: int = 91000):
  """JAX's cuDNN attention checks the installed cuDNN and the device's compute capability while
  lowering; inside, they answer ``version`` and Hopper (this machine has neither)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
  saved = (fa.check_cudnn_version, fa.check_compute_capability,
           fa.is_cuda_compute_capability_equal)
  fa.check_cudnn_version = lambda: version
  fa.check_compute_capability = lambda capability: True
  fa.is_cuda_compute_capability_equal = lambda capability: capability == "9.0"
  try:
    yield
  finally:
    (fa.check_cudnn_version, fa.check_compute_capability,
     fa.is_cuda_compute_capability_equal) = saved


def train_program(preset: str, job: str, *, attention: str, rows: int, seq: int,
                  sharding, vocab_chunk: int | None = None) -> str:
  """Optimised HLO of the one-GPU training step of ``benchmarks/train_step.py`` (``job`` "sft" or
  "dpo", bf16, AdamW, ``rows`` sequences of ``seq`` tokens), compiled for ``sharding``'s
  compile-only device."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from benchmarks import train_step as ts  # pylint: disable=import-outside-toplevel
  from postrl.models import Transformer  # pylint: disable=import-outside-toplevel
  from postrl.trainers.loop import abstract_state  # pylint: disable=import-outside-toplevel
  from postrl.trainers.step import (OptimizerConfig, make_optimizer,  # pylint: disable=import-outside-toplevel
                                    make_train_step)
  cfg = common.model_config(preset, param_dtype="bfloat16", dtype="bfloat16").replace(
      attention_impl=attention)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  tx = make_optimizer(OptimizerConfig(lr=1e-5, total_steps=1000))
  mesh = jax.sharding.Mesh(np.array(list(sharding.device_set)).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))  # train_step.py's MESH on one device
  state, shardings = abstract_state(params, tx, seed=0, mesh=mesh)
  rng = np.random.RandomState(0)
  host = (ts.sft_batch(rng, rows, seq, cfg.vocab_size) if job == "sft"
          else ts.dpo_batch(rng, rows // 2, seq, cfg.vocab_size))
  rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows_sharding)
           for k, v in host.items()}
  step = make_train_step(ts.loss_fn_for(job, graphdef, vocab_chunk), tx,
                         state_shardings=shardings,
                         batch_sharding=rows_sharding, mesh=mesh)
  with backend_reads_gpu(sharding), pretend_cudnn():
    return step.lower(state, batch).compile().as_text()


def decode_program(preset: str, batch: int, *, decode_attention: str, top_p: float,
                   sampling_impl: str, prompt_len: int, new_tokens: int, sharding,
                   pad_rows: bool = True, fmt: str = "bf16", decode_block: str = "auto") -> str:
  """Optimised HLO of ``generate``'s program for a one-GPU run of ``preset`` (bf16, random-weight
  shapes; ``fmt`` "int8" / "int4_g128": every block's Linear quantized, as
  ``benchmarks/decode.py``) at ``batch``, compiled for ``sharding``'s compile-only device;
  ``pad_rows=False`` decodes exactly ``batch`` rows (``generate`` decodes 2 for one prompt of a
  float model: ``min_decode_rows``); ``decode_block``: ``ModelConfig.decode_block_impl``.
  Returns (HLO text, rows decoded)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from benchmarks import generate as gen_bench  # pylint: disable=import-outside-toplevel
  from postrl.models import Transformer  # pylint: disable=import-outside-toplevel
  from postrl.quant import quantize_model  # pylint: disable=import-outside-toplevel
  cfg = common.model_config(preset, param_dtype="bfloat16", dtype="bfloat16")
  cfg = dataclasses.replace(cfg, decode_attention_impl=decode_attention,
                            decode_block_impl=decode_block)

  def build():
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    if fmt != "bf16":
      quantize_model(model, fmt)
    return model

  model = nnx.eval_shape(build)  # shapes only: no weights are made or quantized
  import importlib  # pylint: disable=import-outside-toplevel
  gen = importlib.import_module("postrl.sampling.generate")  # the module, not the function
  rows = (gen.min_decode_rows(batch, "gpu", 1, gen.has_small_float_matmuls(nnx.state(model)))
          if pad_rows else batch)
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  hlo = gen_bench.decode_step_hlo(model, batch, prompt_len, new_tokens, top_p, sampling_impl,
                                  platform="gpu", num_devices=1, place=place,
                                  context=lambda: backend_reads_gpu(sharding), min_rows=rows)
  return hlo, rows


SAMPLER_MODES = {"top_p": dict(top_p=0.9), "top_k": dict(top_k=50), "min_p": dict(min_p=0.05)}


def sampler_program(batch: int, vocab: int, mode: str, *, sharding, fused_finish: bool = True,
                    grid_combine: bool = False, dtype: str = "float32") -> str:
  """Optimised HLO of ``kernels.sampling.sample_gpu`` alone (``default_config(batch, vocab)``
  for the rule ``mode`` of ``SAMPLER_MODES``, with ``fused_finish`` and ``grid_combine`` as
  given) on [batch, vocab] logits, compiled for ``sharding``'s compile-only device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from kernels.sampling.gpu import default_config, sample_gpu  # pylint: disable=import-outside-toplevel
  rule = SAMPLER_MODES[mode]
  cfg = dataclasses.replace(default_config(batch, vocab, **rule), fused_finish=fused_finish,
                            grid_combine=grid_combine)
  x = jax.ShapeDtypeStruct((batch, vocab), jnp.dtype(dtype), sharding=sharding)
  seeds = jax.ShapeDtypeStruct((batch,), jnp.uint32, sharding=sharding)
  f = jax.jit(lambda s, x: sample_gpu(x, s, config=cfg, **rule))
  with backend_reads_gpu(sharding):
    return f.trace(seeds, x).lower(lowering_platforms=("cuda",)).compile().as_text()


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", nargs="+", default=["smollm2-135m"],
                      choices=sorted(common.PRESETS))
  parser.add_argument("--batch", nargs="+", type=int, default=[1, 2, 16])
  parser.add_argument("--decode-attention", nargs="+", default=["auto"],
                      choices=["auto", "xla", "pallas"],
                      help="ModelConfig.decode_attention_impl ('auto' = the kernel, as on one GPU)")
  parser.add_argument("--decode-block", nargs="+", default=["auto"],
                      choices=["auto", "xla", "pallas", "pallas_attention", "pallas_mlp",
                               "pallas_persistent"],
                      help="ModelConfig.decode_block_impl ('pallas': kernels.decode_block's five "
                           "fused launches per layer; 'pallas_attention' / 'pallas_mlp': one half; "
                           "'pallas_persistent': one launch per layer)")
  parser.add_argument("--sampling-impl", default="auto", choices=["auto", "xla", "pallas"])
  parser.add_argument("--formats", nargs="+", default=["bf16"], choices=list(FORMATS),
                      help="weights: bf16, or every block's Linear quantized (postrl.quant)")
  parser.add_argument("--top-p", type=float, default=0.9)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--no-row-padding", action="store_true",
                      help="decode exactly --batch rows (generate decodes 2 rows for 1 prompt on "
                           "one GPU: postrl.sampling.generate.min_decode_rows)")
  parser.add_argument("--row-padding-both", action="store_true",
                      help="compile each shape with and without generate's row padding")
  parser.add_argument("--train", nargs="+", default=None, choices=["sft", "dpo"],
                      help="compile these training steps instead of generate (module docstring)")
  parser.add_argument("--attention", nargs="+", default=["cudnn"], choices=["cudnn", "xla"],
                      help="--train: attention_impl of the model")
  parser.add_argument("--seq", type=int, default=2048, help="--train: tokens per sequence")
  parser.add_argument("--vocab-chunk", type=int, nargs="+", default=[0],
                      help="--train: vocabulary chunks of the loss (0: none, as train_step.py's "
                           "default; the configs use 8192)")
  parser.add_argument("--rows", type=int, default=4, help="--train: sequences per step")
  parser.add_argument("--sampler", nargs="+", default=None, choices=list(SAMPLER_MODES),
                      help="compile kernels.sampling.sample_gpu alone at each --batch x "
                           "--vocab, its default settings, with the one-launch finish and "
                           "with XLA's (GpuConfig.fused_finish), instead of generate")
  parser.add_argument("--vocab", type=int, nargs="+", default=[151936],
                      help="--sampler: vocabulary sizes")
  parser.add_argument("--mosaic-qmm", action="store_true",
                      help="compile the Mosaic GPU quantized matmul's variants and report ptxas's "
                           "registers / spills (module docstring), instead of generate")
  parser.add_argument("--qmm-m", type=int, nargs="+", default=[1, 16, 64],
                      help="--mosaic-qmm: rows of x")
  parser.add_argument("--qmm-shape", default="4096x14336", help="--mosaic-qmm: K x N")
  parser.add_argument("--qmm-variants", nargs="+", default=list(MOSAIC_VARIANTS),
                      choices=list(MOSAIC_VARIANTS), help="--mosaic-qmm: tilings to compile")
  parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
  parser.add_argument("--dump-dir", default=None,
                      help="write each program's optimised HLO and its decode step's launch list")
  parser.add_argument("--out", default=None, help="JSON of every row")
  args = parser.parse_args(argv)
  if any(b < 1 for b in args.batch):
    parser.error(f"--batch: sizes must be >= 1, got {args.batch}")
  return args


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  sharding = compile_only_sharding(args.gpu)
  if args.train:
    return _main_train(args, sharding)
  if args.sampler:
    return _main_sampler(args, sharding)
  if args.mosaic_qmm:
    return _main_mosaic_qmm(args, sharding)
  paddings = [True, False] if args.row_padding_both else [not args.no_row_padding]
  rows = []
  shapes = [(preset, fmt, attention, block, batch, pad) for preset in args.config
            for fmt in args.formats for attention in args.decode_attention
            for block in args.decode_block for batch in args.batch for pad in paddings]
  for preset, fmt, attention, block, batch, pad in shapes:
    t0 = time.perf_counter()
    hlo, rows_decoded = decode_program(
        preset, batch, decode_attention=attention, top_p=args.top_p,
        sampling_impl=args.sampling_impl, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, sharding=sharding, pad_rows=pad, fmt=fmt,
        decode_block=block)
    row = dict(config=preset, format=fmt, batch=batch, row_padding=pad, rows=rows_decoded,
               decode_attention=attention, decode_block=block, top_p=args.top_p,
               sampling_impl=args.sampling_impl,
               compile_s=round(time.perf_counter() - t0, 1), **step_summary(hlo))
    rows.append(row)
    common.log(f"{preset} {fmt} batch {batch}{'' if pad else ' (no row padding)'} attention "
               f"{attention} layer {block}: {row['launches']} launches / "
               f"step, {row['bytes_written'] / 1e6:.1f} MB written / step "
               f"({row['in_place_updates']} in-place updates left out); largest: "
               + "; ".join(f"{x['shape']} x{x['launches']} ({x['source'][:60]})"
                           for x in row["largest"][:3]))
    if args.dump_dir:
      stem = (f"{preset}_{fmt}_b{batch}_{attention}" if fmt != "bf16" else
              f"{preset}_b{batch}_{attention}") + ("" if pad else "_nopad") + (
                  "" if block == "auto" else f"_block-{block}")
      os.makedirs(args.dump_dir, exist_ok=True)
      with open(os.path.join(args.dump_dir, stem + ".hlo.txt"), "w") as f:
        f.write(hlo)
      with open(os.path.join(args.dump_dir, stem + ".fusions.txt"), "w") as f:
        f.write(common.format_launch_list(common.loop_launch_list(hlo), stem))
  common.log(f"{'config':>14} {'format':>10} {'batch':>6} {'rows':>5} {'attention':>10} "
             f"{'layer':>16} {'launches':>9} {'MB written':>11}")
  for r in rows:
    common.log(f"{r['config']:>14} {r['format']:>10} {r['batch']:>6} {r['rows']:>5} "
               f"{r['decode_attention']:>10} {r['decode_block']:>16} {r['launches']:>9} "
               f"{r['bytes_written'] / 1e6:>11.1f}")
  if args.out:
    result = dict(tool="benchmarks/xla_gpu_offline.py", gpu=args.gpu, jax=jax.__version__,
                  target_config=target_config(args.gpu), rows=rows,
                  date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write(args.out, result)
  return rows


def _main_train(args, sharding):
  import jax  # pylint: disable=import-outside-toplevel
  rows = []
  for preset, attention, job, chunk in [(p, a, j, c) for p in args.config
                                         for a in args.attention for j in args.train
                                         for c in args.vocab_chunk]:
    t0 = time.perf_counter()
    hlo = train_program(preset, job, attention=attention, rows=args.rows, seq=args.seq,
                        sharding=sharding, vocab_chunk=chunk or None)
    row = dict(config=preset, job=job, attention=attention, rows=args.rows, seq=args.seq,
               vocab_chunk=chunk or None, compile_s=round(time.perf_counter() - t0, 1),
               **program_summary(hlo))
    rows.append(row)
    common.log(f"{preset} {job} ({attention} attention, {args.rows} x {args.seq} tokens, "
               f"vocab chunk {chunk or 'none'}): {row['launches']} launches, "
               f"{row['bytes_written'] / 1e9:.2f} GB written")
    for kind, k in row["by_kind"].items():
      common.log(f"  {kind:<48} {k['launches']:>6} launches {k['bytes'] / 1e9:>8.2f} GB")
    for w in row["largest"]:
      common.log(f"  {w['bytes'] / 1e9:>7.2f} GB x{w['launches']:<4} {w['kind'][:30]:<30} "
                 f"{w['source'][:70]} | {w['fused'][:50]}")
    if args.dump_dir:
      os.makedirs(args.dump_dir, exist_ok=True)
      name = f"{preset}_{job}_{attention}" + (f"_vc{chunk}" if chunk else "")
      with open(os.path.join(args.dump_dir, name + ".hlo.txt"), "w") as f:
        f.write(hlo)
  if args.out:
    _write(args.out, dict(tool="benchmarks/xla_gpu_offline.py --train", gpu=args.gpu,
                          jax=jax.__version__, target_config=target_config(args.gpu), rows=rows,
                          date=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
  return rows


def _main_sampler(args, sharding):
  import jax  # pylint: disable=import-outside-toplevel
  from kernels.sampling.gpu import default_config  # pylint: disable=import-outside-toplevel
  rows = []
  for mode, batch, vocab in [(m, b, v) for m in args.sampler for b in args.batch
                             for v in args.vocab]:
    row = dict(mode=mode, batch=batch, vocab=vocab,
               draw=default_config(batch, vocab, **SAMPLER_MODES[mode]).draw)
    for fused in (True, False):
      summary = program_summary(sampler_program(batch, vocab, mode, sharding=sharding,
                                                fused_finish=fused))
      row["launches_fused_finish" if fused else "launches_xla_finish"] = summary["launches"]
      row["by_kind_fused_finish" if fused else "by_kind_xla_finish"] = summary["by_kind"]
    if row["draw"] == "cdf":  # GpuConfig.grid_combine: the mass launches combine themselves
      row["launches_grid_combine"] = program_summary(sampler_program(
          batch, vocab, mode, sharding=sharding, grid_combine=True))["launches"]
    rows.append(row)
    common.log(f"sample_gpu {mode} B={batch} V={vocab} ({row['draw']} draw): "
               f"{row['launches_fused_finish']} launches with the one-launch finish, "
               f"{row['launches_xla_finish']} with XLA's"
               + (f", {row['launches_grid_combine']} with grid_combine"
                  if "launches_grid_combine" in row else ""))
  if args.out:
    _write(args.out, dict(tool="benchmarks/xla_gpu_offline.py --sampler", gpu=args.gpu,
                          jax=jax.__version__, target_config=target_config(args.gpu), rows=rows,
                          date=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
  return rows


# --mosaic-qmm: changes to the default MosaicConfig (name -> (fields, x dtype)); "flip_load" swaps
# the plain and upcast loads of the codes
MOSAIC_VARIANTS = {
    "default": ({}, "bfloat16"), "flip_load": ({}, "bfloat16"), "chunk128": (dict(chunk=128),
                                                                             "bfloat16"),
    "one_wgmma": (dict(chunk=None), "bfloat16"), "block_n64": (dict(block_n=64), "bfloat16"),
    "block_n256": (dict(block_n=256), "bfloat16"), "block_k128": (dict(block_k=128), "bfloat16"),
    "math_f32": (dict(math="f32"), "bfloat16"), "f16": ({}, "float16"),
}


def ptxas_summary(text: str) -> dict:
  """Registers per thread and spill bytes from ptxas's ``-v`` report of one kernel."""
  regs = re.search(r"Used (\d+) registers", text)
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
  return dict(registers=int(regs.group(1)) if regs else None,
              spill_stores=int(spill.group(1)) if spill else None,
              spill_loads=int(spill.group(2)) if spill else None)


def ptx_loop_mix(ptx: str, top: int = 12) -> dict:
  """Instruction count of the first loop of a PTX kernel (from its label ``$L__BB0_1`` to the
  branch back to it), by opcode (the text before the first '.'), most frequent first."""
  if "$L__BB0_1:" not in ptx:
    return dict(lines=0, ops={})
  body = ptx[ptx.index("$L__BB0_1:") + len("$L__BB0_1:"):]
  back = re.search(r"bra(\.uni)?\s+\$L__BB0_1;", body)
  body = body[:back.start()] if back else body
  ops = {}
  for line in body.splitlines():
    words = line.strip().replace("@", "@ ").split()
    if words[:1] == ["@"]:
      words = words[2:]  # a predicate guard: @%p1 op ...
    if not words or words[0].startswith(("//", ".", "$", "{", "}")):
      continue
    op = words[0].split(".")[0]
    ops[op] = ops.get(op, 0) + 1
  ordered = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top])
  return dict(lines=sum(ops.values()), ops=ordered)


def mosaic_qmm_kernel_report(m: int, k: int, n: int, *, bits: int, group_size, variant: str,
                             sharding, dump_dir: str) -> dict:
  """Compile ``quantized_matmul_mosaic`` for ``sharding``'s device with ``variant``'s tiling
  and return its config, ptxas's registers / spills (a tiling that spills compiles and says so),
  the kernel's shared memory and its K loop's PTX mix; a tiling the kernel refuses (e.g. over
  the shared-memory budget) is a row with its error."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from kernels.quantized_matmul import mosaic  # pylint: disable=import-outside-toplevel
  fields, dtype = MOSAIC_VARIANTS[variant]
  base = mosaic.default_config(m, k, n, bits=bits, group_size=group_size)
  fields = dict(fields)
  if variant == "flip_load":
    fields["load"] = "plain" if base.load == "upcast" else "upcast"
  if fields.get("chunk", 0) is None:
    fields["chunk"] = base.block_k
  cfg = dataclasses.replace(base, **fields)
  groups = 1 if group_size is None else k // group_size
  args = [jax.ShapeDtypeStruct((m, k), jnp.dtype(dtype), sharding=sharding),
          jax.ShapeDtypeStruct((n, k), jnp.int4 if bits == 4 else jnp.int8, sharding=sharding),
          jax.ShapeDtypeStruct((groups, n), jnp.float32, sharding=sharding)]
  row = dict(m=m, k=k, n=n, bits=bits, group=group_size, variant=variant, dtype=dtype,
             cfg=dataclasses.asdict(cfg))
  os.makedirs(dump_dir, exist_ok=True)
  for name in os.listdir(dump_dir):
    os.remove(os.path.join(dump_dir, name))
  env = dict(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=dump_dir)
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    f = jax.jit(lambda *a: mosaic.quantized_matmul_mosaic(*a, bits=bits, group_size=group_size,
                                                          config=cfg))
    with backend_reads_gpu(sharding):
      f.trace(*args).lower(lowering_platforms=("cuda",)).compile()
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  files = sorted(os.listdir(dump_dir))
  for name in files:
    path = os.path.join(dump_dir, name)
    if name.endswith(".ptxas"):
      with open(path) as fh:
        row.update(ptxas_summary(fh.read()))
    elif name.endswith(".ptx"):
      with open(path) as fh:
        row["loop"] = ptx_loop_mix(fh.read())
    elif name.endswith("resources.txt"):
      with open(path) as fh:
        found = re.search(r"smem_scratch_bytes=(\d+)", fh.read())
      row["smem_bytes"] = int(found.group(1)) if found else None
  if "registers" not in row:
    row["error"] = f"no ptxas report among the dumped files {files}"
  return row


def _main_mosaic_qmm(args, sharding):
  import jax  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  k, n = (int(v) for v in args.qmm_shape.split("x"))
  rows = []
  with tempfile.TemporaryDirectory() as dump_dir:
    for m, (bits, group), variant in [(m, f, v) for m in args.qmm_m
                                      for f in ((8, None), (4, 128))
                                      for v in args.qmm_variants]:
      row = mosaic_qmm_kernel_report(m, k, n, bits=bits, group_size=group, variant=variant,
                                     sharding=sharding, dump_dir=dump_dir)
      rows.append(row)
      cfg = row["cfg"]
      tiling = (f"bn {cfg['block_n']} bk {cfg['block_k']} chunk {cfg['chunk']} {cfg['load']} "
                f"{cfg['math']} {row['dtype']}")
      if "error" in row:
        common.log(f"mosaic qmm M={m} int{bits} {variant} ({tiling}): {row['error']}")
        continue
      loop = row.get("loop", {})
      common.log(f"mosaic qmm M={m} int{bits} {variant:10s} ({tiling}): {row['registers']} "
                 f"registers, spills {row['spill_stores']} / {row['spill_loads']} B, smem "
                 f"{row.get('smem_bytes')} B, K loop {loop.get('lines')} PTX instructions "
                 + ", ".join(f"{op} {c}" for op, c in list(loop.get("ops", {}).items())[:6]))
  if args.out:
    _write(args.out, dict(tool="benchmarks/xla_gpu_offline.py --mosaic-qmm", gpu=args.gpu,
                          jax=jax.__version__, shape=[k, n], rows=rows,
                          date=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
  return rows


def _write(path: str, result: dict):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


if __name__ == "__main__":
  main()
