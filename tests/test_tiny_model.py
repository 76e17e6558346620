import filecmp

import torch
from transformers import AutoModelForCausalLM

from playpen_attribution.tiny_model import build_tiny_model, corpus_from_source


def test_tiny_model_is_deterministic_gemma3_with_its_chat_template(tmp_path, sample_source, tiny_model_dir):
    build_tiny_model(corpus_from_source(sample_source), tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert filecmp.cmp(tmp_path / "again" / name, tiny_model_dir / name, shallow=False), name
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_tiny_tokenizer_renders_gemma_turns(tiny_tokenizer):
    messages = [{"role": "user", "content": " CLUE: sweet "}, {"role": "assistant", "content": "GUESS: honey"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><start_of_turn>user\nCLUE: sweet<end_of_turn>\n<start_of_turn>model\nGUESS: honey<end_of_turn>\n"
    ids = tiny_tokenizer("any text, even ünïcödé ✓", add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == "any text, even ünïcödé ✓"
    assert torch.tensor(ids).max() < len(tiny_tokenizer)
