"""Registers, stack and shared memory of splitkv's Triton kernels, compiled offline for sm_90.

Needs no GPU: the installed Triton compiles each named variant of the attention kernel
(`splitkv/_attention_kernels.py`) and the paged kernel (`splitkv/_paged_triton.py`) to
PTX for sm_90, and the ptxas that ships with Triton builds the cubin, whose resources cuobjdump reports. The
device's Triton may allocate differently (3.6 on the H200 read 254 registers under
ncu where 3.9 here reports 248 for the paged plan launch), so this is for comparing
variants and for checking that a change leaves the generated code alone, not for
absolute figures.

    python benchmarks/triton_resources.py                 # the table
    python benchmarks/triton_resources.py --ptx DIR       # also each variant's PTX, for a diff
    python benchmarks/triton_resources.py --loops         # also each variant's loops in SASS
    python benchmarks/triton_resources.py --loops --page-size 128 --paged-variant variant.py
                                                          # the paged kernels at page 128, and a
                                                          # variant copy of _paged_triton.py's beside them

``--ptx`` writes the PTX without its ``.loc`` / ``.file`` lines and debug sections,
so two runs diff instruction for instruction. ``--loops`` lists each loop of the SASS
(a backward branch and what it jumps over): its instructions, tensor-core ops (HGMMA,
HMMA), global loads (LDG, and LDGSTS, the asynchronous copies), integer and address ops
and float ops, per thread and iteration: a static count, for comparing the key loops of
two kernels (benchmarks/NOTES.md), not a profile.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the fusion default of the device's Triton 3.6

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from splitkv import _attention_kernels, _paged_triton

TARGET = GPUTarget("cuda", 90, 32)


def _signature(fn, pointer_type: str, constexprs: dict) -> dict:
    """Every runtime argument typed by its name: tensors (capitalised, or the launch's
    int32 index tensors) as pointers (the states float32), ``qk_scale`` fp32, the rest
    i32; constexprs as given."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper() or name in _INDEX_POINTERS:
            # Index tensors of the launch (cu_seqlens, tables, counters) are int32.
            signature[name] = "*fp32" if name in _FP32_POINTERS else pointer_type if name in _FLOAT_POINTERS else "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


_INDEX_POINTERS = {"cu_seqlens_q", "cu_seqlens_k", "seqused_k"}
_FLOAT_POINTERS = {"Q", "K", "V", "PrefixK", "PrefixV", "Final"}
# The (split) states and every LSE are float32.
_FP32_POINTERS = {"Out", "Lse", "FinalLse"}


def _attention_variant(prefix_mode: int, fused: bool, splits: bool, block_m=16, block_n=64):
    return {
        "CAUSAL": True, "HAS_SEQUSED_K": False, "PREFIX_MODE": prefix_mode, "FUSED_MERGE": fused,
        "WRITE_FINAL_LSE": fused, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "PREFIX_BLOCK_M": 128 if prefix_mode == _attention_kernels.PrefixMode.PASS else block_m,
        "PREFIX_BLOCK_N": block_n, "INPUT_PRECISION": "tf32", "UPCAST_DOT": False,
    }  # fmt: skip


_MODE = _attention_kernels.PrefixMode
_PASSES_64 = {**_attention_variant(_MODE.PASS, False, True), "PREFIX_BLOCK_M": 64}
_PAGED_PLAN = {
    "CAUSAL": True, "PLAN": True, "PAGE_SIZE": 16, "SAME_KV_STRIDES": True, "INT32_OFFSETS": True, "HEAD_DIM": 128,
    "HEAD_DIM_PAD": 128, "BLOCK_M": 16, "WIDE_BLOCK_M": 64, "BLOCK_N": 64, "INPUT_PRECISION": "tf32",
    "UPCAST_DOT": False,
}  # fmt: skip
# name: (kernel, constexprs, num_warps, num_stages). bf16, head_dim 128, 32 / 8 heads (GQA 4).
VARIANTS = {
    "attention split-KV decode": (_attention_kernels.attention_fwd_kernel,
                                  _attention_variant(_MODE.NONE, False, True), 4, 3),
    "attention split-KV decode, BLOCK_N 32": (_attention_kernels.attention_fwd_kernel,
                                              _attention_variant(_MODE.NONE, False, True, block_n=32), 4, 3),
    "attention prefill 128 x 64": (_attention_kernels.attention_fwd_kernel,
                                   _attention_variant(_MODE.NONE, False, False, block_m=128), 8, 3),
    "cascade passes (prefix pass)": (_attention_kernels.attention_fwd_kernel,
                                     _attention_variant(_MODE.PASS, False, True), 8, 3),
    # The narrow prefix tile most decode launches take (_attention_triton._narrow_prefix_tile).
    "cascade passes, 64-row prefix tile": (_attention_kernels.attention_fwd_kernel, _PASSES_64, 4, 3),
    "cascade, inline prefix": (_attention_kernels.attention_fwd_kernel,
                               _attention_variant(_MODE.INLINE, False, False), 4, 3),
    "cascade, prefix pass + fused merge": (_attention_kernels.attention_fwd_kernel,
                                           _attention_variant(_MODE.PASS, True, True), 8, 3),
    "cascade, inline prefix + fused merge": (_attention_kernels.attention_fwd_kernel,
                                             _attention_variant(_MODE.INLINE, True, True), 4, 3),
    "paged plain decode": (_paged_triton._paged_fwd_kernel, {
        **_PAGED_PLAN, "PLAN": False, "WIDE_BLOCK_M": 16}, 4, 3),
    "paged plan (wide 64 + narrow 16)": (_paged_triton._paged_fwd_kernel, _PAGED_PLAN, 4, 3),
    "paged plan, K / V apart, 64-bit offsets": (_paged_triton._paged_fwd_kernel, {
        **_PAGED_PLAN, "SAME_KV_STRIDES": False, "INT32_OFFSETS": False}, 4, 3),
}  # fmt: skip


def _cuobjdump(cubin: bytes, option: str) -> str:
    """cuobjdump's (CUDA's or Triton's) report ``option`` of a cubin."""
    cuobjdump = shutil.which("cuobjdump") or str(Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([cuobjdump, option, str(path)], capture_output=True, text=True, check=True).stdout


def _cubin_resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the compiled kernel."""
    report = _cuobjdump(cubin, "--dump-resource-usage")
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report)}


_INTEGER_OPS = ("IMAD", "IADD", "LEA", "SHF", "LOP", "ISETP", "SEL", "IABS", "MOV")
_FLOAT_OPS = ("FMUL", "FFMA", "FADD", "FMNMX", "MUFU")


def _sass_loops(cubin: bytes) -> list[dict]:
    """Each loop of the kernel's SASS (a branch back to an earlier address, and the
    instructions from there to it), as counts of its instructions by kind."""
    listing = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if match:
            listing.append((int(match.group(1), 16), match.group(2)))
    index_of = {address: i for i, (address, _) in enumerate(listing)}
    loops = []
    for i, (address, instruction) in enumerate(listing):
        target = re.search(r"BRA.*?0x([0-9a-f]+)", instruction)
        if target and int(target.group(1), 16) <= address and int(target.group(1), 16) in index_of:
            # The opcode, past any predicate.
            ops = [re.sub(r"^@!?U?P\w+\s+", "", body).split()[0]
                   for _, body in listing[index_of[int(target.group(1), 16)]: i + 1]]  # fmt: skip
            loops.append({"instructions": len(ops), "HGMMA": sum("HGMMA" in op for op in ops),
                          "HMMA": sum(op.startswith("HMMA") for op in ops),
                          "LDG": sum(op.startswith("LDG") and not op.startswith("LDGSTS") for op in ops),
                          "LDGSTS": sum(op.startswith("LDGSTS") for op in ops),
                          "integer": sum(op.startswith(_INTEGER_OPS) for op in ops),
                          "float": sum(op.startswith(_FLOAT_OPS) for op in ops)})  # fmt: skip
    return loops


def _clean_ptx(ptx: str) -> str:
    ptx = ptx.split("\t.section\t.debug", 1)[0]
    return "\n".join(line for line in ptx.splitlines() if not re.match(r"\s*\.(loc|file)\b", line)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx", type=Path, help="write each variant's PTX (without line info) into this folder")
    parser.add_argument("--loops", action="store_true", help="also list each variant's loops in SASS (static counts)")
    parser.add_argument("--page-size", type=int, default=16, help="the paged kernels' PAGE_SIZE (default 16)")
    parser.add_argument("--paged-variant", type=Path,
                        help="also compile each paged variant from this copy of splitkv/_paged_triton.py")
    args = parser.parse_args()
    if args.paged_variant:
        from paged_ab import load_variant  # benchmarks/, the script's folder

        variant_kernel = load_variant(args.paged_variant)._paged_fwd_kernel
    variants = dict(VARIANTS)
    for name, (kernel, constexprs, num_warps, num_stages) in VARIANTS.items():
        if kernel is _paged_triton._paged_fwd_kernel:
            variants[name] = (kernel, {**constexprs, "PAGE_SIZE": args.page_size}, num_warps, num_stages)
            if args.paged_variant:
                variants[name + " [variant]"] = (variant_kernel, variants[name][1], num_warps, num_stages)
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}")
    print(f"{'variant':40s} {'warps':>5s} {'stages':>6s} {'registers':>9s} {'stack B':>7s} {'shared B':>8s}")
    for name, (kernel, constexprs, num_warps, num_stages) in variants.items():
        constexprs = {key: (int(value) if isinstance(value, _MODE) else value) for key, value in constexprs.items()}
        signature = _signature(kernel, "*bf16", constexprs)
        # As the launch specialises them on the device's shapes: pointers and strides divisible by 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                 if signature[arg].startswith("*") or arg.startswith("stride_")}  # fmt: skip
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                                  options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip
        used = _cubin_resources(compiled.asm["cubin"])
        print(f"{name:40s} {num_warps:5d} {num_stages:6d} {used.get('REG', -1):9d} {used.get('STACK', -1):7d} "
              f"{compiled.metadata.shared:8d}")  # fmt: skip
        if args.loops:
            for loop in _sass_loops(compiled.asm["cubin"]):
                if loop["instructions"] > 20:  # the key loops, not the tails' small ones
                    print("    loop: " + ", ".join(f"{key} {value}" for key, value in loop.items()))
        if args.ptx:
            args.ptx.mkdir(parents=True, exist_ok=True)
            (args.ptx / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".ptx")).write_text(
                _clean_ptx(compiled.asm["ptx"]))  # fmt: skip


if __name__ == "__main__":
    main()
