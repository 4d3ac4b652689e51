"""load_tokenizer against transformers' fast tokenizer on a small byte-level BPE built here."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import minimoe

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = ["Natalia sold clips to 48 of her friends in April.", "def add(a, b):\n    return a + b",
          "The answer is 72.\n#### 72", "sort: 5 3 9 1 -> 1 3 5 9"] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": QWEN2_TEMPLATE}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "pad_token_id": 0}))
    return d


def test_encode_decode_match_transformers(tok_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tok_dir)
    ours = minimoe.load_tokenizer(tok_dir)
    for text in ["Natalia sold 48 clips.", "  spaces\tand\ntabs ", "ünïcödé ✓", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_special_tokens_and_eos_ids(tok_dir):
    ours = minimoe.load_tokenizer(tok_dir)
    assert ours.pad_token_id == 0 and ours.bos_token_id is None
    assert ours.eos_token_ids == [2, 0]  # generation_config order; tokenizer eos (2) already in it
    assert ours.chat_format == "chatml"


def test_chatml_matches_transformers_chat_template(tok_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tok_dir)
    ours = minimoe.load_tokenizer(tok_dir)
    for messages in ([{"role": "user", "content": "What is 2+3?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sort 3 1 2"}]):
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.format_chat(messages, add_generation_prompt=gen) == expected
    assert ours.format_prompt("Hi") == ref.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                               add_generation_prompt=True)


def test_plain_format_and_left_padded_batch(tok_dir):
    ours = minimoe.load_tokenizer(tok_dir, chat_format="plain")
    assert ours.format_prompt("Q: 2+3?") == "Q: 2+3?"
    batch = ours.batch(["a b c d e", "a"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and mask[0].all() and mask[1, -1] == 1 and mask[1, 0] == 0
    assert ids[1, 0].item() == ours.pad_token_id
    assert ids[1, mask[1].bool()].tolist() == ours.encode("a")
    right = ours.batch(["a b c d e", "a"], padding_side="right")["attention_mask"]
    assert torch.equal(right[1].flip(0), mask[1])


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        minimoe.load_tokenizer(tmp_path)


def test_special_tokens_map_fills_what_tokenizer_config_leaves_out(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "t"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    ref, ours = AutoTokenizer.from_pretrained(d), minimoe.load_tokenizer(d)
    assert ours.eos_token_ids == [ref.eos_token_id] and ours.pad_token_id == ref.pad_token_id


def test_batch_truncation_keeps_the_last_tokens_when_left_padded(tok_dir):
    ours = minimoe.load_tokenizer(tok_dir, chat_format="plain")
    full = ours.encode("a b c d e")
    assert ours.batch(["a b c d e"], max_length=3)["input_ids"][0].tolist() == full[-3:]
    assert ours.batch(["a b c d e"], max_length=100)["input_ids"][0].tolist() == full
    assert ours.batch(["a b c d e"], max_length=3, padding_side="right")["input_ids"][0].tolist() == full[:3]
