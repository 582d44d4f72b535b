"""Lists every subpackage of the mapped folders so that none is silently left out of the wheel."""

from setuptools import find_packages, setup

ROOTS = {
    "server": "aqimodels.server",
    "client": "aqimodels.client",
    "training": "aqimodels.training",
    "process": "aqimodels.process",
    "protos/aqimodels/api": "aqimodels.api",
}
packages = []
for folder, name in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{s}" for s in find_packages(where=folder, exclude=["tests", "tests.*"])]
setup(packages=packages)
