"""xFormers' module path for SwiGLU (``xformers.ops.swiglu_op``): the very objects of :mod:`triformers.ops.swiglu`."""

from triformers.ops.swiglu import *  # noqa: F403
from triformers.ops.swiglu import __all__  # noqa: F401
