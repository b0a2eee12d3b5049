"""LoRA: PEFT's default init (A Kaiming-uniform, B = 0); the base weight stays W."""

from oplora.methods.base import Method, register


@register
class LoRA(Method):
    name = "lora"
