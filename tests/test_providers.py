"""The provider interface: options, registry, lazy imports. No engine needed."""

import pytest

from apiana_lab.errors import ConfigError, MissingDependencyError
from apiana_lab.providers import GenerationOptions, get_provider, provider_class
from apiana_lab.providers import registry

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
    monkeypatch.setitem(registry.BACKENDS, "transformers", "apiana_lab_missing_module_xyz:Nope")
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
