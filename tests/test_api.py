"""kiln.compile, CompiledModel.save and kiln.api.load: an artifact computes what the compiled model
computes (and what transformers computes) without tracing again; every kind of damage or version
skew is an ArtifactError that names the folder, the file and the way out; targets and quant modes
that cannot be used say so before any tracing (quantized compiles: test_api_quant.py)."""

import copy
import dataclasses
import json
import shutil
import textwrap

import pytest
import torch
import transformers as tf

from kiln import __version__, api
from kiln import backends as backend_table
from kiln.backends import reference
from kiln.ir import DType, parse, print_graph
from kiln.ir.storage import Storage, TensorStorage, safetensors_header

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_tokenizer():
    """A word-level tokenizer built in memory (no download), saved next to the tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"the a cat dog sat on mat".split()])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tied-embedding Llama folder with a tokenizer and two eos ids, compiled and saved once:
    (transformers model, model folder, compiled model, artifact folder)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)).eval()
    model.generation_config.eos_token_id = [2, 5]
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    compiled = api.compile(folder, progress=False)
    artifact = compiled.save(tmp_path_factory.mktemp("artifact") / "tiny.kiln", progress=False)
    return model, folder, compiled, artifact


def serving_inputs(config, n, num_blocks=6):
    """One sequence of n tokens prefilled in one step, its blocks in reverse order (so a wrong
    block-table lookup cannot pass by accident), logits for every row; caches sized from the config."""
    block = config["tokens_per_block"]
    blocks = list(range(num_blocks - 1, num_blocks - 1 - (n + block - 1) // block, -1))
    slots = torch.tensor([blocks[p // block] * block + p % block for p in range(n)])
    cache = (num_blocks, block, config["num_kv_heads"], config["head_dim"])
    caches = [torch.zeros(cache, dtype=DType(config["cache_dtype"]).torch) for _ in range(2 * config["num_layers"])]
    return [slots, torch.tensor([blocks], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
            torch.tensor([0, n], dtype=torch.int32), torch.arange(n), *caches]


def logits(compiled, ids):
    n = len(ids)
    inputs = serving_inputs(compiled.config, n)
    return compiled.executable()(ids.int(), torch.arange(n, dtype=torch.int32), *inputs)[0].cpu()


def assert_same_run(loaded, compiled, ids):
    """Bit-identical weights, and logits equal up to summation order: BLAS kernels may pick another
    order for a tensor mapped from the artifact at another alignment than the checkpoint's."""
    got, want = logits(loaded, ids), logits(compiled, ids)
    a, b = loaded.executable().params, compiled.executable().params
    assert a.keys() == b.keys() == loaded.graph.params.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    return got


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None].long()).logits[0]


# -- round trips ---------------------------------------------------------------------------------


def test_tiny_round_trip_matches_compiled_and_transformers(tiny):
    model, folder, compiled, artifact = tiny
    loaded = api.load(artifact, progress=False)
    assert print_graph(loaded.graph, locs=True) == print_graph(compiled.graph, locs=True)
    assert (artifact / "model.ir").read_text() == print_graph(compiled.graph, locs=True)
    assert 'loc("model.layers.1.self_attn")' in (artifact / "model.ir").read_text()
    assert (loaded.target, loaded.dtype, loaded.config, loaded.pipeline) == (
        compiled.target, compiled.dtype, compiled.config, compiled.pipeline)
    assert loaded.stateless is None and compiled.stateless is not None
    assert compiled.device == loaded.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert compiled.config == {"vocab_size": 128, "num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
                               "tokens_per_block": 16, "cache_dtype": "f32", "max_positions": 256,
                               "eos_token_ids": [2, 5], "bos_token_id": 1, "architecture": "LlamaForCausalLM",
                               "source": str(folder)}
    assert compiled.pipeline.endswith("kv-cache{block=16},canonicalize,cse,dce")
    for n in (1, 21):  # 21 tokens span two blocks
        ids = torch.randint(0, 128, (n,))
        got = assert_same_run(loaded, compiled, ids)
        torch.testing.assert_close(got, hf_logits(model, ids), atol=2e-5, rtol=0)
    # the tokenizer travels with the artifact
    assert loaded.tokenizer_source == str(artifact / "tokenizer")
    assert loaded.tokenizer()("the cat sat on a mat")["input_ids"] == [3, 5, 7, 8, 4, 9]
    assert loaded.executable() is loaded.executable()


def test_bf16_round_trip(tiny, tmp_path):
    model, folder, _, _ = tiny
    compiled = api.compile(folder, target="reference", dtype="bf16", progress=False)
    assert compiled.dtype == "bf16" and compiled.config["cache_dtype"] == "bf16"
    loaded = api.load(compiled.save(tmp_path / "bf16", progress=False), progress=False)
    assert safetensors_header(str(tmp_path / "bf16" / "weights.safetensors"))[
        "model.embed_tokens.weight"].dtype is DType.bf16
    ids = torch.randint(0, 128, (9,))
    got = assert_same_run(loaded, compiled, ids)
    want = hf_logits(copy.deepcopy(model).to(torch.bfloat16), ids)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_load_does_not_trace(tiny, monkeypatch):
    _, _, compiled, artifact = tiny

    def refuse(*args, **kwargs):
        raise AssertionError("load must not trace or open the original model")

    import kiln.frontends
    import kiln.frontends.hf

    for module, name in [(kiln.frontends.hf, "trace"), (kiln.frontends.hf, "open_model"), (kiln.frontends, "load")]:
        monkeypatch.setattr(module, name, refuse)
    loaded = api.load(artifact, progress=False)
    assert_same_run(loaded, compiled, torch.randint(0, 128, (5,)))


def test_saving_a_loaded_artifact_into_its_own_folder_keeps_it(tiny, tmp_path):
    _, _, compiled, artifact = tiny
    copy = shutil.copytree(artifact, tmp_path / "copy")
    before = json.loads((copy / "kiln.json").read_text())
    loaded = api.load(copy, progress=False)
    loaded.save(copy, progress=False)  # its weights are mapped from the file being replaced
    assert json.loads((copy / "kiln.json").read_text())["files"] == before["files"]
    assert_same_run(api.load(copy, progress=False), compiled, torch.randint(0, 128, (4,)))


def test_smollm2_round_trip(smollm2, tmp_path):
    stateless, model, _ = smollm2
    compiled = api.compile(stateless.clone(), progress=False)
    assert compiled.config["num_layers"] == 30 and compiled.config["num_kv_heads"] == 3
    loaded = api.load(compiled.save(tmp_path / "smollm2", progress=False), progress=False)
    assert print_graph(loaded.graph, locs=True) == print_graph(compiled.graph, locs=True)
    ids = torch.randint(0, 49152, (12,))
    got = assert_same_run(loaded, compiled, ids)
    torch.testing.assert_close(got, hf_logits(model, ids), atol=3e-4, rtol=1e-5)


# -- what save writes ----------------------------------------------------------------------------

WEIGHTS = """
param @a : f32[4,6]
param @tied : f32[4,6]
param @both : f32[8,6]
param @at : f32[6,4]
param @q : i4[4,6]
param @s : f32[4]
func @main(%x: f32[T,6]) -> (f32[T,4], f32[T,4], f32[T,8], f32[T,4], f32[T,4]) {
  %0 = llm.linear(%x, @a) : f32[T,4]
  %1 = llm.linear(%x, @tied) : f32[T,4]
  %2 = llm.linear(%x, @both) : f32[T,8]
  %3 = core.matmul(%x, @at) : f32[T,4]
  %4 = quant.dequantize(@q, @s) {axis=0} : f32[4,6]
  %5 = llm.linear(%x, %4) : f32[T,4]
  return %0, %1, %2, %3, %5
}
"""


class CountingStorage(Storage):
    """A checkpoint tensor that counts how often it is read."""

    def __init__(self, tensor):
        self.inner, self.reads = TensorStorage(tensor), 0
        self.type = self.inner.type

    def load(self):
        self.reads += 1
        return self.inner.load()


def test_save_reads_each_tensor_once_stores_tied_weights_once_and_packs_i4(tmp_path):
    from kiln.ir.storage import DerivedStorage

    graph = parse(textwrap.dedent(WEIGHTS).lstrip())
    g = torch.Generator().manual_seed(0)
    a = CountingStorage(torch.randn(4, 6, generator=g))
    q = torch.randint(-8, 8, (4, 6), generator=g, dtype=torch.int8)
    graph.params["a"].storage = graph.params["tied"].storage = a
    graph.params["both"].storage = DerivedStorage("core.concat", [a, a], {"dim": 0}, graph.params["both"].type)
    graph.params["at"].storage = DerivedStorage("core.permute", [a], {"dims": (1, 0)}, graph.params["at"].type)
    graph.params["q"].storage = TensorStorage(q)  # unpacked, one value per int8
    graph.params["s"].storage = TensorStorage(torch.rand(4, generator=g))
    x = torch.randn(3, 6, generator=g)
    want = reference.run(graph, x)
    a.reads = 0
    folder = api.CompiledModel(graph, "reference", "f32", {}).save(tmp_path / "w", progress=False)
    assert a.reads == 1
    manifest = json.loads((folder / "kiln.json").read_text())
    assert manifest["aliases"] == {"tied": "a"}
    header = safetensors_header(str(folder / "weights.safetensors"))
    assert set(header) == {"a", "both", "at", "q", "s"}
    assert str(header["q"]) == "u8[4,3]"  # two i4 values per byte
    loaded = api.load(folder, progress=False)
    assert loaded.graph.params["tied"].storage is loaded.graph.params["a"].storage
    for got, expected in zip(reference.run(loaded.graph, x), want, strict=True):
        assert torch.equal(got, expected)


def test_save_refuses_a_parameter_without_data_before_touching_the_folder(tmp_path):
    graph = parse(textwrap.dedent(WEIGHTS).lstrip())
    (tmp_path / "kiln.json").write_text("{}")
    with pytest.raises(ValueError, match="parameter @a has no data to save"):
        api.CompiledModel(graph, "reference", "f32", {}).save(tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kiln.json"]


# -- damaged and foreign artifacts ---------------------------------------------------------------


def edit_manifest(folder, **changes):
    manifest = json.loads((folder / "kiln.json").read_text())
    manifest.update(changes)
    (folder / "kiln.json").write_text(json.dumps(manifest))


def rehash(folder, name):
    """Make kiln.json agree with a file changed on purpose, so that a deeper check must catch it."""
    import hashlib

    manifest = json.loads((folder / "kiln.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "kiln.json").write_text(json.dumps(manifest))


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_ir(folder):
    path = folder / "model.ir"
    path.write_text(path.read_text().replace("llm.paged_attention(", "llm.paged_atention(", 1))
    rehash(folder, "model.ir")


def corrupt_weights_header(folder):
    path = folder / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"
    path.write_bytes(bytes(data))
    rehash(folder, "weights.safetensors")


DAMAGE = {
    "other format version": (lambda f: edit_manifest(f, format_version=api.FORMAT_VERSION + 1),
                             "kiln.json", "artifact format 2; this kiln .* reads format 1"),
    "other kiln major.minor": (lambda f: edit_manifest(f, kiln_version="0.2.0"),
                               "kiln.json", "written by kiln 0.2.0; this kiln is 0.1"),
    "missing manifest": (lambda f: (f / "kiln.json").unlink(), "kiln.json", "is missing"),
    "missing ir": (lambda f: (f / "model.ir").unlink(), "model.ir", "is missing"),
    "missing weights": (lambda f: (f / "weights.safetensors").unlink(), "weights.safetensors", "is missing"),
    "missing tokenizer": (lambda f: shutil.rmtree(f / "tokenizer"), "tokenizer", "is missing"),
    "truncated weights": (lambda f: truncate(f / "weights.safetensors"), "weights.safetensors", "is truncated"),
    "changed weights": (lambda f: flip_last_byte(f / "weights.safetensors"), "weights.safetensors", "sha256"),
    "changed ir": (lambda f: flip_last_byte(f / "model.ir"), "model.ir", "sha256"),
    "corrupt ir": (corrupt_ir, "model.ir", "does not parse: .*unknown op"),
    "corrupt weights": (corrupt_weights_header, "weights.safetensors", "is not readable"),
    "manifest not json": (lambda f: (f / "kiln.json").write_text("{"), "kiln.json", "not valid JSON"),
    "unknown target": (lambda f: edit_manifest(f, target="tpu"), "kiln.json", "names target 'tpu'"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_or_foreign_artifacts_are_clear_errors(tiny, tmp_path, damage):
    _, folder, _, artifact = tiny
    copy = shutil.copytree(artifact, tmp_path / "copy")
    api.load(copy, progress=False)  # whole before the damage
    spoil, file, problem = DAMAGE[damage]
    spoil(copy)
    with pytest.raises(api.ArtifactError, match=problem) as info:
        api.load(copy, progress=False)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and info.value.file == file
    assert str(copy / file) in message and "Recompile the model" in message
    if damage != "missing manifest" and damage != "manifest not json":
        assert repr(str(folder)) in message  # how to recompile names the original model


def test_a_patch_release_reads_the_artifact(tiny, tmp_path):
    _, _, _, artifact = tiny
    copy = shutil.copytree(artifact, tmp_path / "copy")
    major, minor, _ = __version__.split(".")
    edit_manifest(copy, kiln_version=f"{major}.{minor}.99")
    assert api.load(copy, progress=False).target == "reference"


def test_not_a_folder(tmp_path):
    with pytest.raises(api.ArtifactError, match="is not a folder"):
        api.load(tmp_path / "nothing-here")
    assert not api.is_artifact(tmp_path) and not api.is_artifact(tmp_path / "nothing-here")


# -- targets, quant, options ---------------------------------------------------------------------


def test_auto_resolves_to_reference_here_and_says_why(tiny):
    _, _, compiled, artifact = tiny
    backend, reason = backend_table.select("auto")
    assert backend.name == "reference"
    assert "auto chose reference" in reason and "not trt:" in reason and "not cuda:" in reason
    assert compiled.target == "reference" and compiled.target_reason == reason
    assert api.load(artifact, progress=False).target_reason == reason
    assert api.is_artifact(artifact)


def test_auto_takes_the_first_available_backend(monkeypatch):
    """The choice follows the table: a cuda backend that exists on a machine with a GPU wins."""
    cuda = dataclasses.replace(backend_table.BACKENDS["cuda"], module="reference", requires=lambda: None)
    monkeypatch.setitem(backend_table.BACKENDS, "cuda", cuda)
    backend, reason = backend_table.select("auto")
    assert backend.name == "cuda" and reason.startswith("auto chose cuda") and "not trt:" in reason
    gpuless = dataclasses.replace(cuda, requires=lambda: "this machine has no CUDA GPU")
    monkeypatch.setitem(backend_table.BACKENDS, "cuda", gpuless)
    assert backend_table.select("auto")[1].endswith("not cuda: this machine has no CUDA GPU")


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown target 'tpu'; known targets: auto, reference, cuda, trt, onnx"):
        api.compile("/no/such/model", target="tpu")


@pytest.mark.parametrize("target", ["cuda"])   # trt writes its network first (tests/backends/test_trt.py); onnx runs
def test_unavailable_target_fails_before_tracing(target):
    with pytest.raises(api.TargetUnavailableError, match=f"target '{target}' is not available: .*target='reference'"):
        api.compile("/no/such/model", target=target)  # the model is never opened


@pytest.mark.parametrize("quant", api.QUANT_MODES)
def test_quant_modes_parse_before_tracing(quant):
    with pytest.raises(Exception, match="/no/such/model does not exist"):  # the config is fine; the model is not
        api.compile("/no/such/model", target="reference", quant=quant)


def test_unknown_quant_mode():
    with pytest.raises(ValueError, match="quant='int3': unknown quantization algorithm 'int3'.*int4_awq"):
        api.compile("/no/such/model", quant="int3")


def test_graph_input_tokens_per_block_and_pipeline(tiny):
    _, _, compiled, _ = tiny
    stateless = compiled.stateless
    text = print_graph(stateless)
    small = api.compile(stateless, tokens_per_block=4, progress=False)
    assert print_graph(stateless) == text  # the caller's graph is not changed
    assert small.config["tokens_per_block"] == 4 and "kv-cache{block=4}" in small.pipeline
    assert small.graph.inputs[7].type.shape[1] == 4 and small.tokenizer_source is None
    ids = torch.randint(0, 128, (9,))
    torch.testing.assert_close(logits(small, ids), logits(compiled, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="did not produce a serving graph"):
        api.compile(stateless, pipeline="stateless", progress=False)
    with pytest.raises(ValueError, match="tokens_per_block must be a positive int"):
        api.compile(stateless, tokens_per_block=0)
    with pytest.raises(ValueError, match="this graph is already f32"):
        api.compile(stateless, dtype="bf16")
