"""Named pipelines: what each target runs, by name, anywhere a pipeline string is accepted
(`irdump model --pipeline serving --print-after-all`)."""

from __future__ import annotations

CLEANUP = "canonicalize,cse,dce"
FUSE = ("canonicalize,cse,fuse-attention,fuse-rope,fuse-rms-norm,fuse-silu-mul,merge-linears,"
        "canonicalize,cse,dce")

PIPELINES: dict[str, str] = {
    "cleanup": CLEANUP,
    "stateless": FUSE,                                    # the fused forward of one sequence
    "serving": f"{FUSE},kv-cache{{block=16}},{CLEANUP}",  # what the runtime calls every step
    "reference": f"{FUSE},kv-cache{{block=16}},{CLEANUP}",
    "cuda": f"{FUSE},kv-cache{{block=16}},{CLEANUP},fuse-for-kernels,{CLEANUP}",  # the forms kiln's kernels take
    "trt": f"{FUSE},kv-cache{{block=16}},{CLEANUP},fuse-for-kernels,{CLEANUP}",   # the same forms, as TensorRT plugins
    "onnx": f"{FUSE},kv-cache{{block=16}},{CLEANUP}",                   # standard ops only
}
"""Pipeline name -> pipeline string. Targets add theirs as their backends land."""

QUANTIZED_LINEAR_FUSION: dict[str, str] = {
    "reference": "fuse-quantized-linear,dce",
    "cuda": "fuse-quantized-linear,dce",
}
"""Target -> what folds a quantized graph's Q/DQ pairs into quantized GEMMs (run after its pipeline);
targets not listed (onnx, trt) keep the Q/DQ form, which they lower to QuantizeLinear/DequantizeLinear."""
