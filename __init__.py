"""kiln: a compiler and runtime for large language models.

    import kiln
    llm = kiln.LLM("smollm2")                                   # compile for the best target here
    print(llm.generate("The capital of France is", kiln.SamplingParams(max_tokens=16)).outputs[0].text)

    model = kiln.compile("path/to/checkpoint", target="reference")
    model.save("artifact/"); model = kiln.load("artifact/")     # no tracing the second time
"""

__version__ = "0.1.0"

from .api import ArtifactError, CompiledModel, compile, is_artifact, load  # noqa: E402
from .backends import TargetUnavailableError  # noqa: E402
from .ir import Builder, DType, Graph, TensorType, parse, print_graph, verify  # noqa: E402
from .passes.quantize import QuantAlgo, QuantConfig  # noqa: E402
from .runtime.config import BuildConfig, KvCacheConfig  # noqa: E402
from .runtime.engine import CompletionOutput, RequestError, RequestOutput  # noqa: E402
from .runtime.hf_model import AutoModelForCausalLM  # noqa: E402
from .runtime.llm import LLM, RequestFuture  # noqa: E402
from .runtime.sampling import SamplingParams  # noqa: E402

__all__ = [
    "__version__", "AutoModelForCausalLM", "ArtifactError", "CompiledModel", "compile", "is_artifact", "load", "TargetUnavailableError",
    "Builder", "DType", "Graph", "TensorType", "parse", "print_graph", "verify", "BuildConfig", "KvCacheConfig",
    "CompletionOutput", "RequestError", "RequestOutput", "LLM", "RequestFuture", "SamplingParams", "QuantAlgo",
    "QuantConfig",
]
