"""Adaptation methods. Each module here registers one `Method` (`register`); `build` applies it to a causal LM.

Adding a method means one new module here, found by package scan (`oplora.registry.discover`), plus one config file
in configs/method/. A method living outside this package is loaded by naming its module in the method config
(`module: my_package.my_method`).
"""

from oplora.methods.base import AdapterSettings, Method, adapter_settings, build, get_method, methods, register
from oplora.registry import discover

discover(__name__, __path__)

__all__ = ["AdapterSettings", "Method", "adapter_settings", "build", "get_method", "methods", "register"]
