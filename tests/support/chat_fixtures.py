"""Local tokenizers carrying real chat-template styles, and conversations to render with them."""

from __future__ import annotations

import json
import random

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


def tiny_llama_for(tok_dir):
    """``(hf_tokenizer, model)``: transformers' tokenizer of ``tok_dir`` and a tiny random Llama whose
    vocabulary, pad and end-of-text ids match it (the TRL peer checks' model)."""
    import transformers
    from hf_models import build_hf

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    model = build_hf("llama", vocab_size=len(hf_tok), pad_token_id=hf_tok.pad_token_id, bos_token_id=None,
                     eos_token_id=hf_tok.eos_token_id)  # fmt: skip
    return hf_tok, model
