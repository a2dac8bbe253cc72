"""Chat prompts from the GGUF's own Jinja template (`tokenizer.chat_template`), rendered sandboxed."""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgewise.errors import EdgewiseError

# Used when a GGUF carries no template: ChatML, which SmolLM2 and many small models use.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        if source is not None and not isinstance(source, str):
            raise EdgewiseError(f"the model's chat template (metadata 'tokenizer.chat_template') is a {type(source).__name__}, not a Jinja text")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self.template = env.from_string(source or CHATML)
        except TemplateError as exc:
            raise EdgewiseError(f"the model's chat template does not parse: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise EdgewiseError(f"the model's chat template failed to render: {exc}") from None
