"""Build the native extension; all metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cirron_otel._native",
            sources=["src/cirron_otel/_native.c"],
            # header-only units: a change to one of them rebuilds the extension
            depends=[
                "src/cirron_otel/buf.h",
                "src/cirron_otel/compat.h",
                "src/cirron_otel/grisu2.h",
                "src/cirron_otel/native.h",
                "src/cirron_otel/pb.h",
                "src/cirron_otel/_pow10.h",
            ],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wno-missing-field-initializers"],
            libraries=["pthread"],
        )
    ]
)
