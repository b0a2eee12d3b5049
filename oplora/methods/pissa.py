"""PiSSA: A, B from the top-r singular triples of W; the base becomes W_res = W − s·B A."""

from tqdm.auto import tqdm

from oplora.methods.base import Method, absorb_svd_part, lora_layers, register


@register
class PiSSA(Method):
    name = "pissa"
    mutates_base = True
    principal = True  # MiLoRA flips this to take the minor triples

    def svd_needs(self, settings, shape):
        return (settings.r, 0) if self.principal else (0, settings.r)

    def initialize(self, model, settings, svd, tokenizer=None):
        for name, layer in tqdm(list(lora_layers(model)), desc=f"{self.name} init", unit="matrix"):
            W = layer.base_layer.weight
            part = svd.top(W, settings.r, name) if self.principal else svd.bottom(W, settings.r, name)
            absorb_svd_part(layer, part.U, part.S, part.V)
