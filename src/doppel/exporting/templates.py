"""doppel's prompt as other runtimes' chat templates: Jinja (in the GGUF, for llama.cpp's server and LM Studio) and
Go's text/template (in an Ollama Modelfile).

Both render what `serving/chat.Conversation.prompt` renders for a conversation without memory: each run of
same-role messages is one turn, `<|im_start|>Speaker` then one `>>> ` line per message, `<|im_end|>` between
turns, the persona's header opened last. A message that already starts with `>>> ` (a reply the runtime hands back
as it was generated, several messages in one) goes in as it is. The speakers are fixed when the file is written:
the user role is the contact, the assistant role the persona; system messages have no place in doppel's format and
are left out.

What neither runtime can do as doppel does: keep text that spells `<|im_end|>` from becoming the control token
(they tokenize the rendered prompt whole), and recall from the memory index.
"""

from __future__ import annotations

import json

from doppel.render import IM_END, IM_START, PREFIX, header_name


def _jinja_quoted(text: str) -> str:
    """A Jinja string literal that reads back as `text` in Python's Jinja and in llama.cpp's (llama-server --jinja):
    the text as it is, with only `\\"`, `\\\\` and `\\n` escaped, as llama.cpp's engine knows no `\\u`. Names reach
    it as one line (`header_name`), without control characters to escape."""
    return json.dumps(text, ensure_ascii=False)


def _go_quoted(text: str) -> str:
    """A Go string literal in ASCII that reads back as `text`: Ollama's Modelfile parser drops unprintable characters
    from a TEMPLATE (a zero-width space), and Go reads `\\U` for a character outside the BMP, not JSON's surrogate
    pairs (an emoji)."""
    def one(char: str) -> str:
        if char in '"\\':
            return "\\" + char
        if char == "\n":
            return "\\n"
        if " " <= char <= "~":
            return char
        code = ord(char) if not 0xD800 <= ord(char) <= 0xDFFF else 0xFFFD  # a lone surrogate is no character
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return '"' + "".join(map(one, text)) + '"'


def jinja_template(persona: str, user: str) -> str:
    """A Hugging Face / llama.cpp chat template; a message's `name`, where given, names its speaker."""
    persona, user = _jinja_quoted(header_name(persona)), _jinja_quoted(header_name(user))
    return (
        "{%- set ns = namespace(speaker=none) -%}"
        "{%- for m in messages if m['role'] in ['user', 'assistant'] -%}"
        f"{{%- set speaker = m['name'] if m['name'] is defined and m['name'] else ({user} if m['role'] == 'user' "
        f"else {persona}) -%}}"
        "{%- if speaker == ns.speaker -%}{{ '\\n' }}{%- else -%}"
        f"{{%- if ns.speaker is not none -%}}{{{{ {_jinja_quoted(IM_END + chr(10))} }}}}{{%- endif -%}}"
        f"{{{{ {_jinja_quoted(IM_START)} + speaker + '\\n' }}}}"
        "{%- endif -%}"
        f"{{%- if m['content'].startswith({_jinja_quoted(PREFIX)}) -%}}{{{{ m['content'] }}}}"
        f"{{%- else -%}}{{{{ {_jinja_quoted(PREFIX)} + m['content'] }}}}{{%- endif -%}}"
        "{%- set ns.speaker = speaker -%}"
        "{%- endfor -%}"
        f"{{%- if ns.speaker is not none -%}}{{{{ {_jinja_quoted(IM_END + chr(10))} }}}}{{%- endif -%}}"
        f"{{%- if add_generation_prompt -%}}{{{{ {_jinja_quoted(IM_START)} + {persona} + '\\n' }}}}{{%- endif -%}}"
    )


def ollama_template(persona: str, user: str) -> str:
    """An Ollama TEMPLATE (Go text/template over `.Messages`, each with `.Role` and `.Content`)."""
    persona, user = _go_quoted(header_name(persona)), _go_quoted(header_name(user))
    start, end, prefix = _go_quoted(IM_START), _go_quoted(IM_END + "\n"), _go_quoted(PREFIX)
    return (
        '{{- $role := "" }}'
        '{{- range .Messages }}'
        '{{- if or (eq .Role "user") (eq .Role "assistant") }}'
        '{{- if eq .Role $role }}{{ "\\n" }}'
        f'{{{{- else }}}}{{{{ if $role }}}}{{{{ {end} }}}}{{{{ end }}}}{{{{ {start} }}}}'
        f'{{{{- if eq .Role "user" }}}}{{{{ {user} }}}}{{{{ else }}}}{{{{ {persona} }}}}{{{{ end }}}}{{{{ "\\n" }}}}'
        '{{- end }}'
        f'{{{{- if and (ge (len .Content) 4) (eq (slice .Content 0 4) {prefix}) }}}}{{{{ .Content }}}}'
        f'{{{{- else }}}}{{{{ {prefix} }}}}{{{{ .Content }}}}{{{{ end }}}}'
        '{{- $role = .Role }}'
        '{{- end }}'
        '{{- end }}'
        f'{{{{- if $role }}}}{{{{ {end} }}}}{{{{ end }}}}{{{{ {start} }}}}{{{{ {persona} }}}}{{{{ "\\n" }}}}'
    )
