"""Adaptation methods. Each module registers one `Method`; `build` applies it to a causal LM.

Adding a method means one new module here that calls `register`, plus one config file.
"""

from oplora.methods import lora, lora_null, milora, oplora, pissa  # noqa: F401  (registration)
from oplora.methods.base import AdapterSettings, CalibrationSettings, Method, build, get_method, methods, register

__all__ = ["AdapterSettings", "CalibrationSettings", "Method", "build", "get_method", "methods", "register"]
