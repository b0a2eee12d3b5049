"""Adaptation methods. Each module registers one `Method`; `build` applies it to a causal LM.

Adding a method means one new module here that calls `register` (and is listed below), plus one
config file in configs/method/. A method living outside this package is loaded by naming its module
in the method config (`module: my_package.my_method`).
"""

from oplora.methods import lora, lora_null, milora, oplora, pissa  # noqa: F401  (registration)
from oplora.methods.base import AdapterSettings, Method, build, get_method, methods, register

__all__ = ["AdapterSettings", "Method", "build", "get_method", "methods", "register"]
