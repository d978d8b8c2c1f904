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
}
"""Pipeline name -> pipeline string. Targets add theirs as their backends land."""
