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
# Qwen/Qwen3-0.6B's chat template (Apache-2.0), as llama.cpp keeps it in models/templates/Qwen-Qwen3-0.6B.jinja
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
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


def _tok_dir(tok_dir, d, **files):
    """``d`` with tok_dir's tokenizer.json and ``files`` (name -> text or JSON-able object)."""
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    for name, content in files.items():
        name = name.replace("__", ".")
        (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return d


TURNS = ([{"role": "user", "content": "What is 2+3?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sort 3 1 2"}])


def test_template_saved_by_transformers_save_pretrained_is_read(tok_dir, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=QWEN2_TEMPLATE)
    fast.save_pretrained(tmp_path)
    # transformers 5 writes the template to its own file, not into tokenizer_config.json
    assert (tmp_path / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    ref, ours = AutoTokenizer.from_pretrained(tmp_path), minimoe.load_tokenizer(tmp_path)
    assert ours.chat_format == "chatml" and ours.default_system == "You are a helpful assistant."
    assert ours.format_prompt("Hi") == ref.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                               add_generation_prompt=True, tokenize=False)
    for messages in TURNS:
        assert ours.format_chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=False)


def test_chat_template_precedence_is_transformers_tokenizer_precedence(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    # chat_template.jinja wins over tokenizer_config.json, both ways round
    for jinja, in_config, fmt in ((QWEN2_TEMPLATE, plain, "chatml"), (plain, QWEN2_TEMPLATE, "plain")):
        d = _tok_dir(tok_dir, tmp_path / fmt, chat_template__jinja=jinja,
                     tokenizer_config__json={**cfg, "chat_template": in_config})
        ref, ours = AutoTokenizer.from_pretrained(d), minimoe.load_tokenizer(d)
        assert ref.chat_template == jinja == ours.chat_template and ours.chat_format == fmt
    # chat_template.json (the processors' legacy file) loses to tokenizer_config.json, as for AutoTokenizer ...
    d = _tok_dir(tok_dir, tmp_path / "legacy", chat_template__json={"chat_template": plain},
                 tokenizer_config__json={**cfg, "chat_template": QWEN2_TEMPLATE})
    ref, ours = AutoTokenizer.from_pretrained(d), minimoe.load_tokenizer(d)
    assert ref.chat_template == QWEN2_TEMPLATE == ours.chat_template and ours.chat_format == "chatml"
    # ... and is the fallback when nothing else has a template (AutoTokenizer then has none)
    d = _tok_dir(tok_dir, tmp_path / "legacy-only", chat_template__json={"chat_template": QWEN2_TEMPLATE},
                 tokenizer_config__json=cfg)
    assert AutoTokenizer.from_pretrained(d).chat_template is None
    ours = minimoe.load_tokenizer(d)
    assert ours.chat_format == "chatml" and ours.format_prompt("Hi").startswith("<|im_start|>system\n")
    # the list form of tokenizer_config.json: the "default" entry is the template
    d = _tok_dir(tok_dir, tmp_path / "list", tokenizer_config__json={**cfg, "chat_template": [
        {"name": "tool_use", "template": plain}, {"name": "default", "template": QWEN2_TEMPLATE}]})
    ref, ours = AutoTokenizer.from_pretrained(d), minimoe.load_tokenizer(d)
    assert ours.format_prompt("Hi") == ref.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                               add_generation_prompt=True, tokenize=False)


def test_bad_chat_template_files_are_named(tok_dir, tmp_path):
    d = _tok_dir(tok_dir, tmp_path / "a", chat_template__json={"template": QWEN2_TEMPLATE})
    with pytest.raises(ValueError, match=r"chat_template\.json has no 'chat_template' key"):
        minimoe.load_tokenizer(d)
    d = _tok_dir(tok_dir, tmp_path / "b", chat_template__json="{not json")
    with pytest.raises(ValueError, match=r"chat_template\.json is not valid JSON"):
        minimoe.load_tokenizer(d)
    d = _tok_dir(tok_dir, tmp_path / "c", tokenizer_config__json={"chat_template": 3})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: 'chat_template' must be a string, got int"):
        minimoe.load_tokenizer(d)
    d = _tok_dir(tok_dir, tmp_path / "d")
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja is not UTF-8"):
        minimoe.load_tokenizer(d)


@pytest.fixture(scope="module")
def qwen3_dir(tok_dir, tmp_path_factory):
    return _tok_dir(tok_dir, tmp_path_factory.mktemp("qwen3") / "tok", chat_template__jinja=QWEN3_TEMPLATE,
                    tokenizer_config__json={"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                                            "pad_token": "<|endoftext|>"})


def test_qwen3_generation_prompt_matches_its_template(qwen3_dir):
    from transformers import AutoTokenizer

    ref, ours = AutoTokenizer.from_pretrained(qwen3_dir), minimoe.load_tokenizer(qwen3_dir)
    assert ours.chat_format == "chatml" and ours.thinking and ours.default_system is None
    user = [{"role": "user", "content": "What is 2+3?"}]
    for switch in (None, True, False):
        kw = {} if switch is None else {"enable_thinking": switch}
        expected = ref.apply_chat_template(user, add_generation_prompt=True, tokenize=False, **kw)
        assert ours.format_prompt("What is 2+3?", enable_thinking=switch) == expected
        assert ours.format_chat(user, enable_thinking=switch) == expected
        for messages in TURNS:
            assert ours.format_chat(messages, enable_thinking=switch) == ref.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kw)
    assert ours.format_prompt("Hi").endswith("<|im_start|>assistant\n")
    assert ours.format_prompt("Hi", enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the tokenizer's default for the switch (what training/eval prompts use)
    off = minimoe.load_tokenizer(qwen3_dir, enable_thinking=False)
    assert off.format_prompt("Hi") == ref.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                              add_generation_prompt=True, enable_thinking=False)
    assert off.format_prompt("Hi", enable_thinking=True) == ours.format_prompt("Hi")
    with pytest.raises(ValueError, match="enable_thinking must be True, False or None, got 0"):
        ours.format_prompt("Hi", enable_thinking=0)


def test_qwen3_assistant_turns_match_its_template(qwen3_dir, tmp_path):
    from transformers import AutoTokenizer

    ref, ours = AutoTokenizer.from_pretrained(qwen3_dir), minimoe.load_tokenizer(qwen3_dir)
    u, a = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    conversations = [
        [u("Hi"), a("Hello.")],  # the final answer gets an empty <think> block
        [u("Hi"), a("<think>\nsay hi\n</think>\n\nHello.")],  # its reasoning is kept
        [u("Hi"), a("<think>\nsay hi\n</think>\n\nHello."), u("Sort 3 1 2")],  # older reasoning is dropped
        [{"role": "system", "content": "Be brief."}, u("Hi"), a("Hello."), u("2+2?"), a("4")],
        [u("Hi"), {"role": "assistant", "content": "Hello.", "reasoning_content": "greet"}],
    ]
    for messages in conversations:
        for gen in (False, True):
            assert ours.format_chat(messages, add_generation_prompt=gen) == ref.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False), (messages, gen)
    # prompt + response (how training data is built) == the template's rendering of the exchange
    off = minimoe.load_tokenizer(qwen3_dir, enable_thinking=False)
    assert off.format_prompt("Hi") + "Hello.<|im_end|>\n" == ref.apply_chat_template([u("Hi"), a("Hello.")],
                                                                                      tokenize=False)
    # Tokenizer.save keeps the checkpoint's template, so the <think> convention survives a round trip
    ours.save(tmp_path)
    back = minimoe.load_tokenizer(tmp_path)
    assert back.thinking and back.format_chat(conversations[0], add_generation_prompt=False) == ours.format_chat(
        conversations[0], add_generation_prompt=False)


def test_enable_thinking_does_nothing_without_a_thinking_template(tok_dir):
    ours = minimoe.load_tokenizer(tok_dir)
    assert not ours.thinking
    assert ours.format_prompt("Hi", enable_thinking=False) == ours.format_prompt("Hi")
