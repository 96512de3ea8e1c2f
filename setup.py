"""Build script. The C++/CUDA extension gptkern._C is added by the csrc issue; until
then the package is pure Python (Triton kernels are compiled at run time)."""
from setuptools import setup

setup()
