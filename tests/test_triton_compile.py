"""Both Triton kernels lower to a cubin for Hopper (sm_90) with no GPU present.

The interpreter (``TRITON_INTERPRET=1``, set by conftest.py on CPU machines) patches
``triton.language`` for the whole process, so a real compile cannot run in the test process: each
case compiles in a fresh Python with the interpreter off and an empty Triton cache of its own, so
the result never depends on what ``~/.triton`` holds. This catches lowering errors that the
interpreter, which runs kernels as Python, cannot see.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

KL_SIGNATURE = {
    "zs_ptr": "*fp32", "zt_ptr": "*fp32", "loss_ptr": "*fp32", "grad_scale_ptr": "*fp32",
    "n_cols": "i32", "stride_s": "i64", "stride_t": "i64", "inv_temperature": "fp32",
    "temperature_sq": "fp32", "beta": "fp32", "log_beta": "fp32", "log_one_minus_beta": "fp32",
    "DIRECTION": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr",
}
COSINE_SIGNATURE = {
    "hidden_ptr": "*bf16", "positions_ptr": "*i64", "features_ptr": "*fp32", "out_ptr": "*fp32",
    "n_rows": "i32", "hidden_size": "i32", "seq_len": "i32", "n_features": "i32",
    "stride_row": "i64", "stride_token": "i64", "stride_hidden": "i64", "stride_feature": "i64",
    "stride_out": "i64", "eps": "fp32",
    "HAS_POSITIONS": "constexpr", "FEATURES": "constexpr", "BLOCK_N": "constexpr", "BLOCK_H": "constexpr",
}

CASES = {
    "kl": ("refteacher.kernels.kl_triton", "_kl_rows_kernel", KL_SIGNATURE,
           {"DIRECTION": 2, "WRITE_GRAD": True, "BLOCK_V": 4096}),
    "cosine": ("refteacher.kernels.cosine", "_cosine_rows_kernel", COSINE_SIGNATURE,
               {"HAS_POSITIONS": True, "FEATURES": 16, "BLOCK_N": 16, "BLOCK_H": 128}),
}

# Runs in the child: compile one kernel for sm_90 and print what came out (or why it could not).
_CHILD = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget

    module, name, signature, constexprs = json.loads(sys.argv[1])
    kernel = getattr(importlib.import_module(module), name)
    source = triton.compiler.ASTSource(fn=triton.JITFunction(kernel), signature=signature,
                                       constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    except Exception as exc:
        message = str(exc)
        if "ptxas" in message or "not found" in message.lower():
            print(json.dumps({"skip": message[:500]}))
            sys.exit(0)
        raise
    print(json.dumps({"asm": sorted(compiled.asm)}))
""")


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_hopper(case, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(CASES[case])],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in outcome:
        pytest.skip(f"no CUDA toolchain in this triton install: {outcome['skip']}")
    assert "ptx" in outcome["asm"] and "cubin" in outcome["asm"]
