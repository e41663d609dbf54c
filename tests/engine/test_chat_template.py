"""engine.chat_template against transformers' chat-template rendering, and the sandbox.

The oracle is transformers' own renderer (`render_jinja_template`, what `apply_chat_template` calls)
fed the template text from the GGUF and the same special-token strings; a slow test also loads the
whole tokenizer through `AutoTokenizer.from_pretrained(dir, gguf_file=...)` and compares
`apply_chat_template` end to end.
"""

from __future__ import annotations

import pytest

from engine.chat_template import CHATML_TEMPLATE, GEMMA_TURNS_TEMPLATE, ChatTemplate
from engine.errors import ModelFileError, TandemError
from engine.tokenizer import Tokenizer
from tests.engine.test_tokenizer import _tiny_bpe, load_tokenizer, model_paths, open_model

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Write a haiku."}],
    [
        {"role": "system", "content": "Answer in Greek: \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac."},
        {"role": "user", "content": "def f(x):\n    return x * 2\n\nWhat does f do?"},
        {"role": "assistant", "content": "It doubles its argument. \U0001f600"},
        {"role": "user", "content": "  And f('ab')?  "},
    ],
]


def _transformers_render(
    source: str, messages: list[dict[str, str]], add_generation_prompt: bool, **special: str
) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=source, add_generation_prompt=add_generation_prompt, **special
    )
    return rendered[0]


def _model_template(name: str) -> ChatTemplate:
    path = model_paths()[name]
    if path is None:
        pytest.skip(f"{name} is not installed")
    return ChatTemplate.from_gguf(open_model(path), load_tokenizer(name))


@pytest.mark.parametrize("model", ["qwen2.5-coder-0.5b", "smollm2-135m"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(model: str, conversation: int, add_generation_prompt: bool) -> None:
    template = _model_template(model)
    assert template.origin == "file"
    messages = CONVERSATIONS[conversation]
    expected = _transformers_render(
        template.source, messages, add_generation_prompt, **template.special_tokens
    )
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_qwen_template_default_system_prompt_and_special_tokens() -> None:
    template = _model_template("qwen2.5-coder-0.5b")
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    tok = load_tokenizer("qwen2.5-coder-0.5b")
    ids = tok.encode(text)
    assert ids.count(tok.token_id("<|im_start|>")) == 3 and ids.count(tok.token_id("<|im_end|>")) == 2


def test_gemma_file_has_no_template_and_falls_back_to_its_turn_markers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="engine.chat_template"):
        template = _model_template("gemma-3-270m")
    assert template.origin == "gemma-turns fallback"
    assert "no chat template" in caplog.text
    assert template.special_tokens["bos_token"] == "<bos>"
    messages = CONVERSATIONS[1]
    text = template.render(messages)
    assert text == (
        "<start_of_turn>user\nYou are terse.\n\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert text == _transformers_render(GEMMA_TURNS_TEMPLATE, messages, True)
    tok = load_tokenizer("gemma-3-270m")
    assert tok.token_id("<end_of_turn>") in tok.eog_ids
    assert tok.token_id("<start_of_turn>") in tok.encode(text)


def test_chatml_fallback_without_turn_markers(caplog: pytest.LogCaptureFixture) -> None:
    md = _tiny_bpe()
    tok = Tokenizer.from_gguf(md)
    with caplog.at_level("WARNING", logger="engine.chat_template"):
        template = ChatTemplate.from_gguf(md, tok)
    assert template.origin == "chatml fallback" and "ChatML" in caplog.text
    for messages in CONVERSATIONS:
        assert template.render(messages) == _transformers_render(CHATML_TEMPLATE, messages, True)
    assert template.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<|im_start|>user\nx<|im_end|>\n"
    )


def test_sha256_is_the_hash_of_the_template_source() -> None:
    import hashlib

    a = ChatTemplate("{{ messages[0]['content'] }}")
    assert a.sha256 == hashlib.sha256(b"{{ messages[0]['content'] }}").hexdigest()
    assert ChatTemplate(CHATML_TEMPLATE).sha256 != ChatTemplate(GEMMA_TURNS_TEMPLATE).sha256


def test_hf_template_helpers_work() -> None:
    source = (
        "{% for m in messages %}"
        "{% if m.role == 'bad' %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}|{% endfor %}"
        "{% generation %}{{ bos_token }}{% endgeneration %}{{ strftime_now('%Y') | length }}"
        "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}"
    )
    template = ChatTemplate(source, {"bos_token": "<s>"})
    msgs = [
        {"role": "user", "content": "\u00e9"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    expected = _transformers_render(source, msgs, True, bos_token="<s>")
    assert template.render(msgs) == expected
    assert expected.startswith('{"role": "user", "content": "\u00e9"}|')  # tojson keeps non-ASCII
    with pytest.raises(TandemError, match="roles must alternate"):
        template.render([{"role": "bad", "content": ""}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace(__class__=1) %}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ lipsum.__globals__ }}",
        "{{ self.__init__ }}",
    ],
)
def test_sandbox_blocks_escapes(source: str) -> None:
    template = ChatTemplate(source)
    with pytest.raises(ModelFileError, match="unsafe"):
        template.render([{"role": "user", "content": "hi"}])


def test_render_does_not_touch_the_callers_messages() -> None:
    template = ChatTemplate("{% set x = messages.pop() %}{{ messages | length }}")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ModelFileError):
        template.render(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_broken_template_is_a_model_file_error() -> None:
    with pytest.raises(ModelFileError, match="chat template is broken"):
        ChatTemplate("{% for m in messages %}{{ m }")


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", ["smollm2-135m"]
)  # Qwen: ~150 s to load here; its template is covered above
def test_apply_chat_template_end_to_end(model: str) -> None:
    """transformers reads the GGUF itself (tokenizer, special tokens, template)."""
    transformers = pytest.importorskip("transformers")
    path = model_paths()[model]
    if path is None:
        pytest.skip(f"{model} is not installed")
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = Tokenizer.from_gguf(open_model(path))
    template = ChatTemplate.from_gguf(open_model(path), tok)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.render(messages) == expected
