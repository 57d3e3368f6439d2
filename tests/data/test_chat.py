"""Chat rendering and the assistant loss mask, checked against transformers' apply_chat_template on
local tokenizers carrying three real template styles (Llama-3, Phi-3, ChatML), and against
``return_assistant_tokens_mask`` on a template with generation tags."""

from __future__ import annotations

import pytest
from chat_fixtures import CHATML, CONVERSATIONS, GENERATION, LLAMA3, PHI3, make_tokenizer

from effilm.data.chat import conversation, encode_chat
from effilm.data.tokenizer import load_tokenizer
from effilm.errors import EffilmError


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
