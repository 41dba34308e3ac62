"""The C extension only; everything else about the package is in pyproject.toml.

director.dataplane._fastpath is the engine's established-flow loop in C
(docs/packet-path.md, section 7). The engine runs the same logic in Python
when it is not built, so a build without a compiler still works, slower.
"""

from setuptools import Extension, setup

# optional: a machine without a compiler or Python's headers still installs GLB.
setup(ext_modules=[Extension("director.dataplane._fastpath", ["director/dataplane/_fastpath.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
