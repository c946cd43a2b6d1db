"""Root conftest: wires the plugins this repository's own suite uses.

toxtests itself is loaded through its `pytest11` entry point (`pip install -e .`), the
same way users get it, so the suite exercises the real registration.
"""

pytest_plugins = ["pytester"]
