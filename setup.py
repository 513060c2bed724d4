"""Build the native extension; all metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cirron_otel._native",
            # compilation units in the order a record goes through them (native.h: what they share)
            sources=[
                "src/cirron_otel/record.c",
                "src/cirron_otel/scope.c",
                "src/cirron_otel/render.c",
                "src/cirron_otel/drain.c",
                "src/cirron_otel/spool.c",
                "src/cirron_otel/otlp.c",
                "src/cirron_otel/module.c",
            ],
            # header-only units: a change to one of them rebuilds the extension
            depends=[
                "src/cirron_otel/buf.h",
                "src/cirron_otel/compat.h",
                "src/cirron_otel/grisu2.h",
                "src/cirron_otel/json.h",
                "src/cirron_otel/mapping.h",
                "src/cirron_otel/metric_points.h",
                "src/cirron_otel/native.h",
                "src/cirron_otel/pb.h",
                "src/cirron_otel/spantab.h",
                "src/cirron_otel/tsc.h",
                "src/cirron_otel/_pow10.h",
            ],
            extra_compile_args=[
                "-std=c11",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",  # CPython's callback signatures
                "-Wno-missing-field-initializers",
            ],
            libraries=["pthread"],
        )
    ]
)
