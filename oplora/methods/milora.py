"""MiLoRA: PiSSA's construction on the bottom-r (minor) singular triples of W."""

from oplora.methods.base import register
from oplora.methods.pissa import PiSSA


@register
class MiLoRA(PiSSA):
    name = "milora"
    principal = False
