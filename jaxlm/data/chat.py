"""Chat templates: conversations in the OpenAI message format rendered to text, with the spans the
loss counts.

A template is Jinja text as in a Hugging Face `tokenizer_config.json` ("chat_template"). It is
rendered the way transformers' `apply_chat_template` renders it, so that a model exported with
its template gets, in transformers, exactly the text jaxlm trained on: a sandboxed environment
with `trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `tojson` filter that keeps
non-ASCII text, `raise_exception` and `strftime_now`, and the variables `messages`, `tools`,
`documents`, `add_generation_prompt`, `bos_token` and `eos_token`. The `{% generation %}` block
some templates carry renders its body.

The trained spans are found by rendering prefixes of the conversation: for each assistant
message i, the text of messages[:i] with the generation prompt ends where the reply starts, and
the text of messages[:i+1] ends where it stops (the end-of-turn text the template puts after it
included, so the model learns to end its turn). A template whose renderings of shorter
conversations are not prefixes of the whole one is refused with the message at fault.

jaxlm's own template (`DEFAULT_TEMPLATE`, for models whose tokenizer has none) starts with the
start token (`bos_token`, which is EOS for the models jaxlm pretrains) and ends every message with
`eos_token`: `<|user|>` newline content EOS, and so on.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime

from jaxlm.errors import DataError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def compile_template(text: str):
    """The compiled Jinja template (DataError when it does not parse)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


def render(template: str, messages: list[dict], specials: dict[str, str], add_generation_prompt: bool = False) -> str:
    """The text of `messages` under `template`; `specials`: bos_token, eos_token (and any other token
    names the template reads)."""
    import jinja2

    try:
        return compile_template(template).render(messages=messages, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **specials)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template failed on a conversation: {e}") from None


def segments(template: str, messages: list[dict], specials: dict[str, str]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces in order, trained = an assistant reply
    (see the module docstring). DataError when the template is not prefix-stable."""
    whole = render(template, messages, specials)
    pieces, at = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(template, messages[:i], specials, add_generation_prompt=True)
        through = render(template, messages[:i + 1], specials)
        if not (through.startswith(before) and whole.startswith(through) and len(before) >= at):
            raise DataError(f"the chat template renders message {i} (assistant) so that the conversation up to it "
                            "is not a prefix of the whole; jaxlm finds the reply's text by those prefixes, so this "
                            "template cannot mark what to train on (use data.loss_on=all, or another template)")
        pieces += [(whole[at:len(before)], False), (whole[len(before):len(through)], True)]
        at = len(through)
    pieces.append((whole[at:], False))
    return [(t, trained) for t, trained in pieces if t]


def _folder_template(folder: str) -> str:
    """A Hugging Face folder's template: chat_template.jinja, else tokenizer_config.json's chat_template."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template") or ""
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
        return template if isinstance(template, str) else ""
    return ""


def resolve(template: str, tokenizer: str) -> str:
    """The template text data.chat_template names (a file or the text), else the one beside
    data.tokenizer (`_folder_template`), else jaxlm's own."""
    if template:
        if "{" not in template and os.path.isfile(os.path.expanduser(template)):
            with open(os.path.expanduser(template), encoding="utf-8") as f:
                return f.read()
        if "{" not in template:
            raise DataError(f"data.chat_template={template!r} is neither a file nor a Jinja template")
        return template
    if tokenizer:
        folder = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer)
        found = _folder_template(folder)
        if found:
            return found
    return DEFAULT_TEMPLATE
