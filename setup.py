"""Build the native extension; all metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cirron_otel._native",
            sources=["src/cirron_otel/_native.c"],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wno-missing-field-initializers"],
            libraries=["pthread"],
        )
    ]
)
