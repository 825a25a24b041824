from setuptools import Extension, setup

# The C helper is optional: where it cannot be built, gaman_sync falls back
# to wsproto's pure-Python unmasking (see gaman_sync/protocol.py).
setup(ext_modules=[Extension("gaman_sync._speedups", ["gaman_sync/_speedups.c"],
                             optional=True)])
