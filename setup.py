"""Build of kvray's optional C extension (``kvray._speedups``); everything else is in
pyproject.toml. Without a C compiler the install still succeeds and kvray runs its pure-Python
twins of the same functions (``kvray.core.fast``): index writes about 1.5× slower
(benchmarks/results/native.md)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvray._speedups",
            sources=["kvray/_ext/speedups.c"],
            include_dirs=["kvray/_ext"],
            depends=["kvray/_ext/xxhash.h"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
