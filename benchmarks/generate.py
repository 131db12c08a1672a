r"""Generation throughput: postrl ``generate`` vs transformers ``generate``, one run, same settings.

    python benchmarks/generate.py --batch 1 16 --new-tokens 64             # CPU, real SmolLM2 file
    python benchmarks/generate.py --config llama-1b --batch 1 16 64 256 --new-tokens 256 \
        --time-limit 420                                                    # GPU, random weights
    python benchmarks/generate.py --config tiny --batch 2 --new-tokens 8 --repeats 1   # smoke test

The model is a checkpoint (``--model``: a shipped name, a HF folder or a GGUF file) or a preset
shape with random weights (``--config``: smollm2-135m, llama-1b = Llama-3.2-1B, tiny), which
needs no files; transformers then builds ``LlamaForCausalLM`` from the same shape, also with
random weights (sampling cost does not depend on the values). ``--dtype`` (default: bfloat16 on
an accelerator, float32 on CPU) is the parameter and the compute dtype of both.

Random prompts of ``--prompt-len`` tokens, top-p sampling (``--top-p``, no top-k), EOS ignored
(every row decodes exactly ``--new-tokens``: postrl with ``eos_ids=()``, transformers with
``min_new_tokens``). Timings exclude compilation (one warm-up call per shape; transformers warms
up with a short call) and take the median of ``--repeats`` calls; GPU timings end with
``block_until_ready`` / ``torch.cuda.synchronize``.

transformers runs in a child process (its own CUDA context: no JAX/torch library clash, and each
framework has its own memory; JAX then preallocates only ``--jax-mem-fraction`` of the GPU). The
child builds its model once and times each shape on request, so every shape's row has both
numbers as soon as it is done.

The bandwidth bound: bytes each decode step must read (the weights once plus the whole allocated
KV cache of P + N slots, which postrl's masked decode attention reads) at the larger of the
memory bandwidths measured in this run (a device-to-device elementwise copy of ``--copy-mib``
MiB, counted as read + write, and a matrix-vector product's read), times the batch.

``--launches`` compiles postrl's program once more and counts, from its optimised HLO, the
operations one decode step launches (``common.loop_launches``); ``--dump-hlo DIR`` also writes
that HLO text (``DIR/<config>_b<batch>.hlo.txt``, gzip-compressed as ``.hlo.txt.gz`` above
``--dump-hlo-gzip-mib``, 8 MiB) and ``DIR/<config>_b<batch>.fusions.txt``: the decode step's
launched operations one per line in program order (launches per step, kind such as
``fusion:kLoop`` or ``custom-call:__cublas$gemm``, name, output shape, enclosing loop / call,
fused opcodes, Python source, JAX op name; ``common.loop_launch_list``); the row records both
paths.

Progress is printed (flushed) per shape and the JSON (device, versions, date) is rewritten after
every shape, so a killed run keeps its finished rows; ``--time-limit`` skips the remaining shapes
(and the baseline) once the budget is spent, and still writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
  sys.path.insert(0, ROOT)

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position

_REPLY = "@@hf "  # prefix of the transformers child's protocol lines on its stdout


# ----------------------------------------------------------------------------- bandwidth


def _min_seconds(f, *args, repeats):
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def copy_bandwidth(n_bytes=512 * 2**20, repeats=5):
  """Bytes moved per second (read + write) by a large jitted copy: the memory-bandwidth limit."""
  import jax  # pylint: disable=import-outside-toplevel
  x = jax.numpy.ones((n_bytes // 4,), jax.numpy.float32)
  return 2 * n_bytes / _min_seconds(jax.jit(lambda a: a + 1.0), x, repeats=repeats)


def matvec_bandwidth(n_bytes=512 * 2**20, repeats=5):
  """Bytes read per second by a large jitted matrix-vector product (multi-threaded on CPU, where
  XLA's elementwise copy runs on one thread and underestimates what the memory system gives)."""
  import jax  # pylint: disable=import-outside-toplevel
  n = int((n_bytes // 4) ** 0.5)
  w = jax.numpy.ones((n, n), jax.numpy.float32)
  v = jax.numpy.ones((1, n), jax.numpy.float32)
  return n * n * 4 / _min_seconds(jax.jit(lambda a, b: b @ a), w, v, repeats=repeats)


def bytes_per_decode_step(cfg, batch, cache_len, param_bytes):
  """Weights plus the whole KV cache, read once per decode step."""
  kv = 2 * cfg.num_hidden_layers * batch * cache_len * cfg.num_key_value_heads * cfg.dim_per_head
  return cfg.num_params() * param_bytes + kv * param_bytes


# ----------------------------------------------------------------------------- postrl


def time_postrl(model, batch, prompt_len, new_tokens, repeats, top_p,
                sampling_impl: str = "auto") -> dict:
  """Tokens/s of ``postrl.sampling.generate`` (median of ``repeats`` calls after one compiling
  call) and the seconds of that first call; ``sampling_impl`` as ``generate``'s."""
  import jax  # pylint: disable=import-outside-toplevel
  from postrl.sampling import generate  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  tokens = rng.randint(100, model.config.vocab_size, (batch, prompt_len)).astype(np.int32)
  lengths = np.full((batch,), prompt_len, np.int32)

  def call(seed):
    out = generate(model, tokens, lengths, key=jax.random.key(seed), max_new_tokens=new_tokens,
                   temperature=1.0, top_p=top_p, eos_ids=(), sampling_impl=sampling_impl)
    jax.block_until_ready(out.tokens_BxN)

  t0 = time.perf_counter()
  call(0)
  first = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    call(r + 1)
    times.append(time.perf_counter() - t0)
  return dict(tokens_per_s=batch * new_tokens / statistics.median(times), first_call_s=first,
              seconds=times)


def with_execution(model, **options):
  """``model`` with these ``ModelConfig`` execution options (``EXECUTION_OPTIONS``: e.g.
  ``decode_block_impl``), the same parameters."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from postrl.models import Transformer  # pylint: disable=import-outside-toplevel
  if all(getattr(model.config, k) == v for k, v in options.items()):
    return model
  cfg = dataclasses.replace(model.config, **options)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.merge(nnx.graphdef(abstract), nnx.state(model))


def time_variant(row: dict, prefix: str, model, args, batch: int, sampling_impl: str,
                 launches: bool):
  """``row[prefix + "_tokens_per_s" / "_ms_per_step" (/ "_launches_per_step")]`` of ``model``'s
  decode, or ``row[prefix + "_error"]``: one variant beside the row's main numbers."""
  try:
    other = time_postrl(model, batch, args.prompt_len, args.new_tokens, args.repeats, args.top_p,
                        sampling_impl=sampling_impl)
    row[f"{prefix}_tokens_per_s"] = round(other["tokens_per_s"], 1)
    row[f"{prefix}_ms_per_step"] = round(1e3 * batch / other["tokens_per_s"], 3)
    if launches:
      row[f"{prefix}_launches_per_step"] = decode_step_launches(
          model, batch, args.prompt_len, args.new_tokens, args.top_p, sampling_impl=sampling_impl)
  except Exception as e:  # pylint: disable=broad-except
    row[f"{prefix}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def resolved_sampler(vocab: int, batch: int, top_p: float, impl: str) -> str:
  """What ``generate``'s sampler ``impl`` runs at this batch on this backend: "pallas_gpu" (the
  kernel) or "xla (N bits a pass)" (the threshold search, ``default_bits_per_pass``)."""
  from kernels import sampling as sampling_kernels  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from postrl.sampling.generate import (  # pylint: disable=import-outside-toplevel
      default_bits_per_pass, min_decode_rows)
  rows = min_decode_rows(batch, jax.default_backend(), jax.device_count())  # a float model
  chosen = "xla" if impl == "xla" else sampling_kernels.choose_impl(
      vocab, temperature=1.0, top_p=top_p, impl=impl, batch=rows)
  return chosen if chosen != "xla" else f"xla ({default_bits_per_pass(rows)} bits a pass)"


def decode_step_hlo(model, batch, prompt_len, new_tokens, top_p,
                    sampling_impl: str = "auto", *, platform: str | None = None,
                    num_devices: int | None = None, place=None, context=None,
                    min_rows: int | None = None) -> str:
  """The optimised HLO text of the program ``time_postrl`` runs (``common.loop_launches`` reads
  what one decode step launches from it).

  Compiles ``postrl.sampling.generate``'s jitted body again with the arguments ``generate``
  gives it (the persistent compilation cache, when set, makes this a cache hit): the sampler,
  the bits per pass and the rows decoded (``min_decode_rows``) for ``platform`` (default: JAX's
  backend) and ``num_devices`` (default: JAX's device count). ``model`` may be abstract
  (``nnx.eval_shape``) when ``place`` maps each input array to what ``lower`` takes (e.g. a
  ``jax.ShapeDtypeStruct`` on a compile-only device: ``benchmarks/xla_gpu_offline.py``), and
  ``context`` (a context-manager factory) wraps the lowering and compilation only. ``min_rows``
  overrides the rows decoded (e.g. ``batch``: the program without ``generate``'s padding).
  """
  import contextlib  # pylint: disable=import-outside-toplevel
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  gen = importlib.import_module("postrl.sampling.generate")  # the module, not the function
  platform = platform or jax.default_backend()
  num_devices = jax.device_count() if num_devices is None else num_devices
  place = place or (lambda x: x)
  graphdef, params = nnx.split(model)
  params = jax.tree.map(place, params)
  tokens = place(np.full((batch, prompt_len), 100, np.int32))
  lengths = place(np.full((batch,), prompt_len, np.int32))
  rows = (gen.min_decode_rows(batch, platform, num_devices, gen.has_small_float_matmuls(params))
          if min_rows is None else min_rows)
  impl = sampling_impl
  if impl == "auto":
    from kernels import sampling as sampling_kernels  # pylint: disable=import-outside-toplevel
    impl = sampling_kernels.choose_impl(model.config.vocab_size, temperature=1.0, top_k=None,
                                        top_p=top_p, min_p=None, impl="auto", batch=rows,
                                        platform=platform)
  key = place(jax.random.key(0))
  with (context or contextlib.nullcontext)():
    lowered = gen._generate.lower(  # pylint: disable=protected-access
        graphdef, params, tokens, lengths, key, max_new_tokens=new_tokens,
        temperature=1.0, top_k=None, top_p=top_p, min_p=None, eos_ids=(), pad_id=0,
        sampling_impl=impl, interpret=False, min_rows=rows,
        bits_per_pass=gen.default_bits_per_pass(rows, platform))  # as ``generate`` picks them
    return lowered.compile().as_text()


def decode_step_launches(model, batch, prompt_len, new_tokens, top_p,
                         sampling_impl: str = "auto") -> dict:
  """``common.loop_launches`` of the program ``time_postrl`` runs: what one decode step launches
  (``decode_step_hlo``'s text)."""
  return common.loop_launches(
      decode_step_hlo(model, batch, prompt_len, new_tokens, top_p, sampling_impl))


def dump_hlo(hlo_text: str, directory: str, stem: str, title: str = "",
             gzip_bytes: float = 8 * 2**20) -> dict:
  """Writes ``<directory>/<stem>.hlo.txt`` (``.hlo.txt.gz`` when larger than ``gzip_bytes``): the
  whole optimised HLO, and ``<stem>.fusions.txt``: the decode loop body's launched operations,
  one per line in program order (``common.format_launch_list`` of ``common.loop_launch_list``).
  Returns ``{"hlo": path, "fusions": path, "instructions": lines, "launches": sum of counts}``."""
  import gzip  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  data = hlo_text.encode()
  hlo_path = os.path.join(directory, f"{stem}.hlo.txt")
  if len(data) > gzip_bytes:
    hlo_path += ".gz"
    with gzip.open(hlo_path, "wb") as f:
      f.write(data)
  else:
    with open(hlo_path, "wb") as f:
      f.write(data)
  entries = common.loop_launch_list(hlo_text)
  fusions_path = os.path.join(directory, f"{stem}.fusions.txt")
  with open(fusions_path, "w") as f:
    f.write(common.format_launch_list(entries, title))
  return dict(hlo=hlo_path, fusions=fusions_path, instructions=len(entries),
              launches=sum(e["count"] for e in entries))


def dump_stem(args, batch: int) -> str:
  """``<config>_b<batch>``: the preset's name, or the checkpoint's file / folder name."""
  name = args.config or os.path.basename(os.path.normpath(args.model))
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + f"_b{batch}"


# ----------------------------------------------------------------------------- transformers


def build_transformers_model(args):
  """(model, device) for the child: the checkpoint of ``--model`` or the preset shape of
  ``--config`` with random weights (transformers' own initialisation, seed 0)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  if args.config:
    cfg = common.model_config(args.config, param_dtype=args.dtype, dtype=args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
      hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    return hf.to(tdt).eval(), device
  from postrl.models.weights import resolve_model_path  # pylint: disable=import-outside-toplevel
  path = resolve_model_path(args.model)
  if os.path.isdir(path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdt)
  else:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=tdt)
  return hf.to(device).eval(), device


def time_transformers(hf, device, *, batch, prompt_len, new_tokens, repeats, top_p) -> dict:
  """Tokens/s of ``hf.generate`` (sampling, top-p only, exactly ``new_tokens`` per row), median
  of ``repeats`` calls after a short warm-up call on the same batch shape."""
  import torch  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  ids = torch.tensor(rng.randint(100, hf.config.vocab_size, (batch, prompt_len)), device=device)
  kw = dict(do_sample=True, top_p=top_p, top_k=0, temperature=1.0,
            attention_mask=torch.ones_like(ids), pad_token_id=0)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with torch.no_grad():
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=min(8, new_tokens), min_new_tokens=min(8, new_tokens), **kw)
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
      sync()
      t0 = time.perf_counter()
      out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
      sync()
      times.append(time.perf_counter() - t0)
  if out.shape[1] != prompt_len + new_tokens:
    raise RuntimeError(f"transformers produced {out.shape[1] - prompt_len} tokens, expected "
                       f"{new_tokens}")
  return dict(tokens_per_s=batch * new_tokens / statistics.median(times), first_call_s=first,
              seconds=times)


def hf_worker(args):
  """The child process: builds the transformers model, then answers one JSON request per stdin
  line with one ``_REPLY`` line on stdout (everything else it prints goes to stderr)."""
  reply_to = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # anything else written to stdout, by Python or a library, lands on stderr
  sys.stdout = sys.stderr

  def reply(**fields):
    reply_to.write(_REPLY + json.dumps(fields) + "\n")
    reply_to.flush()

  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    t0 = time.perf_counter()
    hf, device = build_transformers_model(args)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    reply(ready=True, build_s=time.perf_counter() - t0, device=device_name,
          attn_implementation=getattr(hf.config, "_attn_implementation", None),
          versions=dict(torch=torch.__version__, transformers=transformers.__version__))
  except Exception as e:  # pylint: disable=broad-except  (reported to the parent, which goes on)
    reply(ready=False, error=f"{type(e).__name__}: {e}")
    return
  for line in sys.stdin:
    request = json.loads(line)
    try:
      reply(**time_transformers(hf, device, **request))
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory at a large batch)
      reply(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
      if device == "cuda":
        torch.cuda.empty_cache()


class Baseline(common.ChildProcess):
  """The transformers child: ``start()`` launches it (its start-up overlaps the parent's model
  build), ``ready(timeout)`` waits for its model, ``time(...)`` asks for one shape. Any failure
  or timeout kills it and returns ``{"error": ...}``; the parent then goes on without it."""

  def __init__(self, args):
    super().__init__(_REPLY, "transformers")
    self.args = args
    self.info = None

  def start(self):
    cmd = [sys.executable, os.path.abspath(__file__), "--hf-worker", "--dtype", self.args.dtype]
    cmd += ["--config", self.args.config] if self.args.config else ["--model", self.args.model]
    self.launch(cmd)

  def ready(self, timeout: float) -> dict:
    if self.info is None and self.error is None:
      info = self.read(timeout)
      if info.get("ready"):
        self.info = info
      elif self.error is None:
        self.fail(info.get("error", "transformers failed to start"))
    return self.info or {"error": self.error}

  def time(self, timeout: float, **request) -> dict:
    if self.error is not None:
      return {"error": self.error}
    self.send(request)
    return self.read(timeout)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
  """Command-line arguments; without ``--model`` or ``--config`` the shipped SmolLM2 is used."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--model", default=None,
                      help="shipped name, HF folder or GGUF file (default smollm2-135m-instruct)")
  source.add_argument("--config", choices=sorted(common.PRESETS), default=None,
                      help="preset shape with random weights (no files needed)")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="params and compute (default: bfloat16 on GPU/TPU, float32 on CPU)")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--top-p", type=float, default=0.9, help="1.0 = plain sampling")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--decode-attention", nargs="+", default=["auto"],
                      choices=["auto", "xla", "pallas"],
                      help="attention over the KV cache per decode step (ModelConfig."
                           "decode_attention_impl): the first gives the row's postrl_* numbers; "
                           "each other adds postrl_attention_<impl>_* fields")
  parser.add_argument("--decode-block", nargs="+", default=["auto"],
                      choices=["auto", "xla", "pallas", "pallas_attention", "pallas_mlp",
                               "pallas_persistent"],
                      help="each decoder layer of a cached step (ModelConfig.decode_block_impl; "
                           "'pallas': kernels.decode_block's five fused launches per layer, "
                           "'pallas_attention' / 'pallas_mlp': one half fused, "
                           "'pallas_persistent': one launch per layer): the "
                           "first gives the row's postrl_* numbers; each other adds "
                           "postrl_block_<impl>_* fields (and launches with --launches)")
  parser.add_argument("--sampling-impl", nargs="+", default=["auto"],
                      choices=["xla", "auto", "pallas"],
                      help="samplers to time: the first gives the row's postrl_* numbers (default "
                           "'auto', generate's default); each other adds postrl_<impl>_* fields")
  parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
  parser.add_argument("--no-row-padding", action="store_true",
                      help="decode exactly --batch rows: turns off generate's second row for "
                           "one prompt on one GPU (postrl.sampling.generate.min_decode_rows), "
                           "for an A/B of it")
  parser.add_argument("--launches", action="store_true",
                      help="also count the operations one decode step launches (compiles the "
                           "program once more and reads its optimised HLO)")
  parser.add_argument("--dump-hlo", metavar="DIR", default=None,
                      help="write each shape's optimised HLO (the text --launches reads) to "
                           "DIR/<config>_b<batch>.hlo.txt[.gz] and the decode step's launched "
                           "operations, one per line, to DIR/<config>_b<batch>.fusions.txt "
                           "(implies --launches)")
  parser.add_argument("--dump-hlo-gzip-mib", type=float, default=8.0,
                      help="--dump-hlo gzip-compresses an HLO text larger than this (0: always)")
  parser.add_argument("--time-limit", type=float, default=None,
                      help="seconds for the whole run; later shapes are skipped once spent")
  parser.add_argument("--copy-mib", type=int, default=None,
                      help="bandwidth-probe size (default: 2048 on GPU/TPU, 512 on CPU)")
  parser.add_argument("--jax-mem-fraction", type=float, default=0.45,
                      help="GPU memory JAX preallocates when the transformers baseline runs")
  parser.add_argument("--out", default="benchmarks/results/generate.json")
  parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if not args.config and not args.model:
    args.model = "smollm2-135m-instruct"
  return args


def _fmt(row, key, spec):
  return "-" if row.get(key) is None else format(row[key], spec)


def print_table(bandwidth: dict, rows: list[dict]):
  """The summary table (the one in docs/benchmarks.md)."""
  common.log(f"memory bandwidth on {bandwidth['device']}: copy {bandwidth['copy'] / 1e9:.1f} GB/s "
             f"(read + write), matrix-vector read {bandwidth['matvec'] / 1e9:.1f} GB/s; bound uses "
             f"the larger")
  common.log(f"{'batch':>6} {'postrl tok/s':>14} {'transformers tok/s':>19} {'ratio':>7} "
             f"{'bound tok/s':>12} {'of bound':>9}")
  for r in rows:
    common.log(f"{r['batch']:>6} {_fmt(r, 'postrl_tokens_per_s', '.1f'):>14} "
               f"{_fmt(r, 'transformers_tokens_per_s', '.1f'):>19} "
               f"{_fmt(r, 'ratio', '.2f') + ('x' if r.get('ratio') else ''):>7} "
               f"{r['bandwidth_bound_tokens_per_s']:>12.1f} "
               f"{_fmt(r, 'fraction_of_bound', '.1%'):>9}")


def run(args):
  """Measures every batch size of ``args`` (see the module docstring); returns the JSON dict."""
  budget = common.Budget(args.time_limit)
  baseline = None
  if not args.no_baseline:
    baseline = Baseline(args)
    baseline.start()  # its imports and model build overlap ours (nothing is timed yet)
  try:
    return _run(args, budget, baseline)
  finally:
    if baseline is not None:
      baseline.close()


def _run(args, budget, baseline):
  import jax  # pylint: disable=import-outside-toplevel
  on_cpu = jax.default_backend() == "cpu"
  env = common.environment()
  if args.config:
    cfg = common.model_config(args.config, param_dtype=args.dtype, dtype=args.dtype)
    model = common.random_model(cfg)
  else:
    from postrl.models import load_pretrained  # pylint: disable=import-outside-toplevel
    model = load_pretrained(args.model, param_dtype=args.dtype, dtype=args.dtype)
    cfg = model.config
  model = with_execution(model, decode_attention_impl=args.decode_attention[0],
                         decode_block_impl=args.decode_block[0])
  if args.no_row_padding:  # generate and decode_step_hlo both read the module's function
    import importlib  # pylint: disable=import-outside-toplevel
    gen_module = importlib.import_module("postrl.sampling.generate")
    gen_module.min_decode_rows = lambda batch, platform, num_devices, small=True: batch
  settings = {k: v for k, v in vars(args).items() if k != "hf_worker"}
  results = common.Results(args.out, **env, settings=settings, model=dict(
      name=args.config or args.model, random_weights=bool(args.config),
      num_params=cfg.num_params(), config=cfg.to_hf()), status="running",
      xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      xla_flags=os.environ.get("XLA_FLAGS", ""), rows=[])
  common.log(f"{env['device']} ({env['backend']}), jax {jax.__version__}; model "
             f"{args.config or args.model}: {cfg.num_params() / 1e6:.0f}M params, {args.dtype}")

  if baseline is not None:
    info = baseline.ready(timeout=min(budget.left(), 600))
    results.update(transformers=info)
    common.log(f"transformers: {json.dumps(info)}")

  copy_bytes = (args.copy_mib or (512 if on_cpu else 2048)) * 2**20
  repeats = 5 if on_cpu else 10
  bandwidth = dict(device=env["device"], copy=copy_bandwidth(copy_bytes, repeats=repeats),
                   matvec=matvec_bandwidth(copy_bytes, repeats=repeats))
  best = max(bandwidth["copy"], bandwidth["matvec"])
  results.update(copy_bandwidth_bytes_per_s=bandwidth["copy"],
                 matvec_bandwidth_bytes_per_s=bandwidth["matvec"], bandwidth_probe_bytes=copy_bytes)
  common.log(f"bandwidth: copy {bandwidth['copy'] / 1e9:.1f} GB/s, matvec "
             f"{bandwidth['matvec'] / 1e9:.1f} GB/s ({budget.elapsed():.0f} s)")

  param_bytes = 2 if args.dtype == "bfloat16" else 4
  main_impl = args.sampling_impl[0]
  rows, skipped = [], []
  for batch in args.batch:
    if budget.over():
      skipped.append(batch)
      continue
    step_bytes = bytes_per_decode_step(cfg, batch, args.prompt_len + args.new_tokens, param_bytes)
    bound = best / step_bytes * batch  # tokens/s if each step only streamed its bytes once
    row = dict(batch=batch, bandwidth_bound_tokens_per_s=round(bound, 1),
               bytes_per_decode_step=step_bytes, postrl_sampling_impl=main_impl,
               postrl_decode_attention=args.decode_attention[0],
               postrl_decode_block=args.decode_block[0],
               postrl_sampler=resolved_sampler(cfg.vocab_size, batch, args.top_p, main_impl))
    common.log(f"batch {batch}: postrl (compiles first) ... ({budget.elapsed():.0f} s)")
    try:
      ours = time_postrl(model, batch, args.prompt_len, args.new_tokens, args.repeats, args.top_p,
                         sampling_impl=main_impl)
      row.update(postrl_tokens_per_s=round(ours["tokens_per_s"], 1),
                 postrl_ms_per_step=round(1e3 * batch / ours["tokens_per_s"], 3),
                 postrl_first_call_s=round(ours["first_call_s"], 2),
                 postrl_seconds=[round(t, 4) for t in ours["seconds"]],
                 fraction_of_bound=round(ours["tokens_per_s"] / bound, 3))
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: keep the others)
      row["postrl_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if (args.launches or args.dump_hlo) and not budget.over():
      try:
        hlo = decode_step_hlo(model, batch, args.prompt_len, args.new_tokens, args.top_p,
                              sampling_impl=main_impl)
        row["postrl_launches_per_step"] = common.loop_launches(hlo)
        common.log(f"batch {batch}: one decode step launches "
                   f"{row['postrl_launches_per_step']['launches']} operations "
                   f"{json.dumps(row['postrl_launches_per_step']['by_op'])}")
      except Exception as e:  # pylint: disable=broad-except
        hlo = None
        row["postrl_launches_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      if args.dump_hlo and hlo is not None:
        title = (f"{dump_stem(args, batch)}: {args.config or args.model}, batch {batch}, "
                 f"prompt {args.prompt_len}, {args.new_tokens} new tokens, top-p {args.top_p}, "
                 f"sampling xla, {args.dtype}, {env['device']} ({env['backend']}), jax "
                 f"{jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
        try:
          row["postrl_hlo_files"] = dump_hlo(hlo, args.dump_hlo, dump_stem(args, batch), title,
                                             gzip_bytes=args.dump_hlo_gzip_mib * 2**20)
          common.log(f"batch {batch}: wrote {row['postrl_hlo_files']['hlo']} and "
                     f"{row['postrl_hlo_files']['fusions']}")
        except OSError as e:
          row["postrl_hlo_error"] = f"{type(e).__name__}: {e}"
    # the same decode with another sampler, attention over the cache, or decoder-layer path
    variants = [(f"postrl_{impl}", f"sampling_impl={impl}", model, impl, args.launches)
                for impl in args.sampling_impl[1:] if impl != main_impl]
    variants += [(f"postrl_attention_{impl}", f"decode_attention_impl={impl}",
                  with_execution(model, decode_attention_impl=impl), main_impl, False)
                 for impl in args.decode_attention[1:] if impl != args.decode_attention[0]]
    variants += [(f"postrl_block_{impl}", f"decode_block_impl={impl}",
                  with_execution(model, decode_block_impl=impl), main_impl, args.launches)
                 for impl in args.decode_block[1:] if impl != args.decode_block[0]]
    for prefix, label, other_model, sampler, launches in variants:
      if budget.over():
        break
      common.log(f"batch {batch}: postrl, {label} ... ({budget.elapsed():.0f} s)")
      time_variant(row, prefix, other_model, args, batch, sampler, launches)
    if baseline is not None and not budget.over():
      common.log(f"batch {batch}: postrl {row.get('postrl_tokens_per_s')} tokens/s; transformers "
                 f"... ({budget.elapsed():.0f} s)")
      timeout = budget.left() + 60 if args.time_limit is not None else 3600
      ref = baseline.time(timeout=timeout, batch=batch,
                          prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          repeats=args.repeats, top_p=args.top_p)
      if "error" in ref:
        row["transformers_error"] = ref["error"]
      else:
        row.update(transformers_tokens_per_s=round(ref["tokens_per_s"], 1),
                   transformers_seconds=[round(t, 4) for t in ref["seconds"]])
        if row.get("postrl_tokens_per_s"):
          row["ratio"] = round(row["postrl_tokens_per_s"] / row["transformers_tokens_per_s"], 2)
    elif baseline is not None:
      row["transformers_error"] = "skipped: time limit"
    rows.append(row)
    results.append("rows", row)
    common.log(f"batch {batch}: {json.dumps({k: v for k, v in row.items() if 'seconds' not in k})}"
               f" ({budget.elapsed():.0f} s)")
  status = "complete" if not skipped else f"time limit: skipped batch sizes {skipped}"
  results.update(status=status, elapsed_s=round(budget.elapsed(), 1))
  print_table(bandwidth, rows)
  common.log(f"{status}; wrote {args.out}")
  return results.doc


def main(argv=None):
  """The benchmark, or (``--hf-worker``) the transformers child process it starts."""
  args = parse_args(argv)
  if args.hf_worker:
    if args.dtype is None:
      args.dtype = "float32"
    hf_worker(args)
    return
  if not args.no_baseline:  # leave GPU memory to the transformers process (read at backend start)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.jax_mem_fraction))
  if args.dtype is None:
    args.dtype = common.default_dtype()
  run(args)


if __name__ == "__main__":
  main()
