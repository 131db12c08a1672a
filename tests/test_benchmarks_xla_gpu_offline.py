"""benchmarks/xla_gpu_offline.py without the CUDA plugin: the target description, the byte count
of HLO shapes and the per-step summary (on a decode program compiled here for the CPU). The
compile for an H100 itself needs ``jax-cuda13-pjrt`` of this JAX version, which is not a test
dependency (installed, it prints a plugin error at every ``import jax`` that has no
``JAX_PLATFORMS``): its counts are in docs/benchmarks.md with the command."""

import re

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks import generate as gen_bench
from benchmarks import xla_gpu_offline as offline


def test_target_config_describes_an_h100():
  text = offline.target_config("h100")
  assert "core_count: 132" in text and "l2_cache_size: 52428800" in text
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text
  assert 'platform_name: "CUDA"' in text and text.count("{") == text.count("}")
  fields = dict(re.findall(r"^  (\w+): (\S+)$", text, re.M))
  assert fields["shared_memory_per_block_optin"] == str(227 * 1024)
  assert int(fields["memory_bandwidth"]) == 3_352_320_000_000


def test_shape_bytes():
  assert offline.shape_bytes("bf16[576,192]") == 576 * 192 * 2
  assert offline.shape_bytes("(f32[2,128], s32[2,128])") == 2 * 128 * 8
  assert offline.shape_bytes("pred[]") == 1 and offline.shape_bytes("f32[]") == 4
  assert offline.shape_bytes("(bf16[576,1536], bf16[576,1536])") == 2 * 576 * 1536 * 2


_LOOP_HLO = """HloModule m

%fused_mul (p0: bf16[8,4], p1: bf16[8]) -> bf16[8,4] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %p1 = bf16[8]{0} parameter(1)
  %b = bf16[8,4]{1,0} broadcast(%p1), dimensions={0}
  ROOT %m = bf16[8,4]{1,0} multiply(%p0, %b)
}

%fused_dus (c: bf16[2,16,4], u: bf16[2,1,4], i: s32[]) -> bf16[2,16,4] {
  %c = bf16[2,16,4]{2,1,0} parameter(0)
  %u = bf16[2,1,4]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = bf16[2,16,4]{2,1,0} dynamic-update-slice(%c, %u, %z, %i, %z)
}

%body (s: (s32[], bf16[8,4], bf16[8], bf16[2,16,4])) -> (s32[], bf16[8,4], bf16[8], bf16[2,16,4]) {
  %s = (s32[], bf16[8,4]{1,0}, bf16[8]{0}, bf16[2,16,4]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %w = bf16[8,4]{1,0} get-tuple-element(%s), index=1
  %x = bf16[8]{0} get-tuple-element(%s), index=2
  %c = bf16[2,16,4]{2,1,0} get-tuple-element(%s), index=3
  %mul = bf16[8,4]{1,0} fusion(%w, %x), kind=kLoop, calls=%fused_mul
  %u = bf16[2,1,4]{2,1,0} slice(%c), slice={[0:2], [0:1], [0:4]}
  %loop_dynamic_update_slice_fusion = bf16[2,16,4]{2,1,0} fusion(%c, %u, %i), kind=kLoop, calls=%fused_dus
  ROOT %t = (s32[], bf16[8,4]{1,0}, bf16[8]{0}, bf16[2,16,4]{2,1,0}) tuple(%i, %mul, %x, %loop_dynamic_update_slice_fusion)
}

%cond (s: (s32[], bf16[8,4], bf16[8], bf16[2,16,4])) -> pred[] {
  %s = (s32[], bf16[8,4]{1,0}, bf16[8]{0}, bf16[2,16,4]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: (s32[], bf16[8,4], bf16[8], bf16[2,16,4])) -> (s32[], bf16[8,4], bf16[8], bf16[2,16,4]) {
  %a = (s32[], bf16[8,4]{1,0}, bf16[8]{0}, bf16[2,16,4]{2,1,0}) parameter(0)
  ROOT %w = (s32[], bf16[8,4]{1,0}, bf16[8]{0}, bf16[2,16,4]{2,1,0}) while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
}
"""


def test_step_summary_counts_written_bytes_and_leaves_in_place_updates_out():
  """The multiply writes its whole [8, 4] output; the slice writes [2, 1, 4]; the cache update
  (output: the whole cache) is an in-place update, counted apart."""
  got = offline.step_summary(_LOOP_HLO)
  assert got["launches"] == common.loop_launches(_LOOP_HLO)["launches"] == 3
  assert got["in_place_updates"] == 1
  assert got["bytes_written"] == 8 * 4 * 2 + 2 * 1 * 4 * 2
  assert got["largest"][0]["shape"] == "bf16[8,4]" and got["largest"][0]["bytes"] == 64
  assert got["by_kind"] == {"fusion:kLoop": 2, "slice": 1}


def test_decode_step_hlo_rows_and_placement_on_cpu():
  """``decode_step_hlo`` with abstract parameters (``place``) and a ``min_rows`` override compiles
  the program ``generate`` runs; two rows for one prompt give [2, ...] arrays inside the loop and
  [1, N] outputs. The step summary reads it."""
  cfg = common.model_config("tiny", param_dtype="float32", dtype="float32")
  from postrl.models import Transformer  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  place = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
  hlo = {rows: gen_bench.decode_step_hlo(model, 1, 4, 3, 0.9, "xla", platform="cpu",
                                         num_devices=1, place=place, min_rows=rows)
         for rows in (1, 2)}
  assert "s32[2,3]" in hlo[2] and "s32[2,3]" not in hlo[1]  # the tokens buffer of the loop
  for text in hlo.values():
    summary = offline.step_summary(text)
    assert summary["launches"] == common.loop_launches(text)["launches"] > 0
    assert summary["bytes_written"] > 0
  # no override: generate's own choice on this CPU (one prompt, one row)
  default = gen_bench.decode_step_hlo(model, 1, 4, 3, 0.9, "xla", platform="cpu", num_devices=1,
                                      place=place)
  assert "s32[2,3]" not in default


def test_program_summary_counts_the_whole_program():
  """--train's summary: every launched instruction of the program, a loop body its trip count
  times (4 here), in-place updates included; by kind and largest writers add up."""
  got = offline.program_summary(_LOOP_HLO)
  assert got["launches"] == 3 * 4
  per_step = 8 * 4 * 2 + 2 * 1 * 4 * 2 + 2 * 16 * 4 * 2
  assert got["bytes_written"] == 4 * per_step
  assert sum(k["launches"] for k in got["by_kind"].values()) == 12
  assert sum(w["bytes"] for w in got["largest"]) == got["bytes_written"]


def test_pretend_cudnn_restores_the_checks():
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel
  before = fa.check_cudnn_version
  with offline.pretend_cudnn(91000):
    assert fa.check_cudnn_version() == 91000 and fa.check_compute_capability("9.0")
  assert fa.check_cudnn_version is before


def test_an_async_pair_is_one_launch_and_writes_its_done_output():
  """``fusion-start`` carries its operands in its output tuple: the bytes come from the done."""
  start = dict(key="fusion-start", count=2, shape="((bf16[1024,1024]), bf16[8,8], u32[])")
  done = dict(key="fusion-done", count=2, shape="bf16[8,8]")
  plain = dict(key="fusion", count=3, shape="f32[4]")
  assert offline._launches_and_bytes(start) == (2, 0)  # pylint: disable=protected-access
  assert offline._launches_and_bytes(done) == (0, 2 * 8 * 8 * 2)  # pylint: disable=protected-access
  assert offline._launches_and_bytes(plain) == (3, 3 * 16)  # pylint: disable=protected-access


def test_sampler_mode_parses_and_times_the_sampling_benchmark_rules():
  """``--sampler`` compiles ``sample_gpu`` for the rules ``benchmarks/sampling.py`` times (the
  counts, 15 -> 8 launches at B = 64 with the one-launch finish, are in docs/benchmarks.md)."""
  from benchmarks.sampling import MODES  # pylint: disable=import-outside-toplevel
  args = offline.parse_args(["--sampler", "top_p", "min_p", "--batch", "1", "64", "--vocab",
                             "32000", "151936"])
  assert args.sampler == ["top_p", "min_p"] and args.vocab == [32000, 151936]
  assert offline.SAMPLER_MODES == MODES


_PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    0 bytes stack frame, 216 bytes spill stores, 224 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 1 bytes smem
"""

_PTX = """.visible .entry k(
)
{
\tmov.b32 \t%r1, 0;
$L__BB0_1:
\t.loc\t1 256 11
\tld.shared.b16 \t%rs1, [%rd33];
\tld.shared.b16 \t%rs2, [%rd33+1024];
\t// begin inline asm
\t{
\t.reg .b32 s<3>;
\tprmt.b32 s0, %r69, 0x43, 16704;
\tsub.bf16x2 %r101, s1, s2;
\t}
\t// end inline asm
\t@%p13 cp.async.bulk.tensor.3d.shared::cluster.global [%r9], [%rd9], [%r3];
\tsetp.ne.b32 \t%p12, %r628, 32768;
\t@%p12 bra \t$L__BB0_1;
\tret;
}
"""


def test_ptxas_summary_and_the_k_loop_mix():
  """The --mosaic-qmm report's parsers: ptxas's registers and spills, and the opcodes of a PTX
  kernel's first loop (guards, inline-asm braces and directives skipped; nothing after the
  branch back)."""
  assert offline.ptxas_summary(_PTXAS) == dict(registers=255, spill_stores=216, spill_loads=224)
  assert offline.ptxas_summary("nothing") == dict(registers=None, spill_stores=None,
                                                  spill_loads=None)
  mix = offline.ptx_loop_mix(_PTX)
  assert mix["ops"] == {"ld": 2, "prmt": 1, "sub": 1, "cp": 1, "setp": 1}
  assert mix["lines"] == 6
  assert offline.ptx_loop_mix("no loop") == dict(lines=0, ops={})


def test_mosaic_qmm_variants_parse():
  args = offline.parse_args(["--mosaic-qmm", "--qmm-m", "1", "16", "--qmm-variants", "default",
                             "flip_load"])
  assert args.mosaic_qmm and args.qmm_m == [1, 16] and args.qmm_variants == ["default",
                                                                               "flip_load"]
  assert set(offline.MOSAIC_VARIANTS) >= {"default", "flip_load", "one_wgmma", "f16"}
