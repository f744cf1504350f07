"""Triton kernels, one op per file, each with its pure-PyTorch reference beside it.

Installed as ``charlm.kernels`` (setup.py maps this folder): ``from charlm.kernels import rope``.
"""
