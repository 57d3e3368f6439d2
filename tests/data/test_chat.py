"""Chat rendering and the assistant loss mask, checked against transformers' apply_chat_template on
local tokenizers carrying three real template styles (Llama-3, Phi-3, ChatML), and against
``return_assistant_tokens_mask`` on a template with generation tags."""

from __future__ import annotations

import json
import random

import pytest

from effilm.data.chat import conversation, encode_chat
from effilm.data.tokenizer import load_tokenizer
from effilm.errors import EffilmError

# Written here in the templates' well-known shapes (the special strings are the published ones).
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERATION = (  # ChatML with the assistant's content and end-of-turn token in {% generation %} tags
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|im_start|>", "<|im_end|>"]  # fmt: skip
WORDS = "the river stone runs fast over seven small hills and the capital of france is paris".split()

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a river."},
     {"role": "assistant", "content": "The Seine runs fast."}, {"role": "user", "content": "And a stone?"},
     {"role": "assistant", "content": " Granite, seven small hills of it. "}],
]  # fmt: skip


def make_tokenizer(root, template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) + "?." for _ in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "chat_template": template, "add_bos_token": False, "add_eos_token": False,
    }))  # fmt: skip
    return root


@pytest.mark.parametrize("name, template", [("llama3", LLAMA3), ("phi3", PHI3), ("chatml", CHATML)])
def test_ids_equal_transformers_apply_chat_template(tmp_path, name, template):
    tf = pytest.importorskip("transformers")
    d = make_tokenizer(tmp_path / name, template)
    theirs = tf.AutoTokenizer.from_pretrained(str(d))
    ours = load_tokenizer(d)
    for conv in CONVERSATIONS:
        ids, mask = encode_chat(ours, conv)
        want = theirs.apply_chat_template(conv, tokenize=True, add_generation_prompt=False, return_dict=True)["input_ids"]
        assert ids == list(want), name
        # the mask covers exactly the assistant contents and the token ending each assistant turn
        text = ours.decode([i for i, m in zip(ids, mask) if m])
        for m in conv:
            if m["role"] == "assistant":
                assert m["content"].strip() in text
        assert "capital of France" not in text and "Answer briefly" not in text
        ends = [ours.decode([i]) for i, m, nxt in zip(ids, mask, mask[1:] + [0]) if m and not nxt]
        assert ends == [{"llama3": "<|eot_id|>", "phi3": "<|end|>", "chatml": "<|im_end|>"}[name]] * sum(
            m["role"] == "assistant" for m in conv)


def test_mask_equals_transformers_assistant_tokens_mask(tmp_path):
    tf = pytest.importorskip("transformers")
    d = make_tokenizer(tmp_path / "gen", GENERATION)
    theirs = tf.AutoTokenizer.from_pretrained(str(d))
    ours = load_tokenizer(d)
    for conv in CONVERSATIONS:
        out = theirs.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = encode_chat(ours, conv)
        assert ids == list(out["input_ids"]) and mask == list(out["assistant_masks"])
        assert sum(mask) > 0


def test_bad_chat_records_name_the_place():
    good = {"messages": CONVERSATIONS[0]}
    assert conversation(good, "f:1") == CONVERSATIONS[0]
    assert conversation({"prompt": "Hi?", "completion": "Hello."}, "f:2")[-1] == {"role": "assistant",
                                                                                    "content": "Hello."}
    cases = [
        ({"messages": [{"role": "user", "content": "only a question"}]}, "f:3: no assistant turn"),
        ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
         "f:3: messages\\[0\\] has role 'wizard'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
         "messages\\[0\\].content must be a string"),
        ({"text": "plain"}, "f:3: a chat record needs 'messages'"),
        ({"messages": []}, "must be a non-empty list"),
    ]  # fmt: skip
    for rec, match in cases:
        with pytest.raises(EffilmError, match=match):
            conversation(rec, "f:3")


def test_a_template_that_fails_or_rewrites_history_is_an_error(tmp_path):
    failing = "{{ raise_exception('system messages are not supported') }}"
    d = make_tokenizer(tmp_path / "fail", failing)
    with pytest.raises(EffilmError, match="f:7: chat template: system messages are not supported"):
        encode_chat(load_tokenizer(d), CONVERSATIONS[0], "f:7")
    # a template that prints the number of messages first: earlier renderings are not prefixes
    rewriting = "{{ messages | length }}" + CHATML
    d = make_tokenizer(tmp_path / "rewrite", rewriting)
    with pytest.raises(EffilmError, match="renders earlier turns differently"):
        encode_chat(load_tokenizer(d), CONVERSATIONS[0], "f:8")
