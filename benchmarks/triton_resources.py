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

``--ptx`` writes the PTX without its ``.loc`` / ``.file`` lines and debug sections,
so two runs diff instruction for instruction.
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
    "cascade, inline prefix": (_attention_kernels.attention_fwd_kernel,
                               _attention_variant(_MODE.INLINE, False, False), 4, 3),
    "cascade, prefix pass + fused merge": (_attention_kernels.attention_fwd_kernel,
                                           _attention_variant(_MODE.PASS, True, True), 8, 3),
    "cascade, inline prefix + fused merge": (_attention_kernels.attention_fwd_kernel,
                                             _attention_variant(_MODE.INLINE, True, True), 4, 3),
    "paged plain decode": (_paged_triton._paged_fwd_kernel, {
        "CAUSAL": True, "PLAN": False, "PAGE_SIZE": 16, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_M": 16, "WIDE_BLOCK_M": 16,
        "BLOCK_N": 64, "INPUT_PRECISION": "tf32", "UPCAST_DOT": False}, 4, 3),
    "paged plan (wide 64 + narrow 16)": (_paged_triton._paged_fwd_kernel, {
        "CAUSAL": True, "PLAN": True, "PAGE_SIZE": 16, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_M": 16, "WIDE_BLOCK_M": 64,
        "BLOCK_N": 64, "INPUT_PRECISION": "tf32", "UPCAST_DOT": False}, 4, 3),
}  # fmt: skip


def _cubin_resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the compiled kernel, from cuobjdump (CUDA's or Triton's)."""
    cuobjdump = shutil.which("cuobjdump") or str(Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                                check=True).stdout  # fmt: skip
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report)}


def _clean_ptx(ptx: str) -> str:
    ptx = ptx.split("\t.section\t.debug", 1)[0]
    return "\n".join(line for line in ptx.splitlines() if not re.match(r"\s*\.(loc|file)\b", line)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx", type=Path, help="write each variant's PTX (without line info) into this folder")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}")
    print(f"{'variant':40s} {'warps':>5s} {'stages':>6s} {'registers':>9s} {'stack B':>7s} {'shared B':>8s}")
    for name, (kernel, constexprs, num_warps, num_stages) in VARIANTS.items():
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
        if args.ptx:
            args.ptx.mkdir(parents=True, exist_ok=True)
            (args.ptx / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".ptx")).write_text(
                _clean_ptx(compiled.asm["ptx"]))  # fmt: skip


if __name__ == "__main__":
    main()
