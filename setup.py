# Builds the one C helper of the Postgres relay (plugins/postgres/_framewalk.c).
# optional=True: where no compiler is at hand the install still succeeds and the
# pure-Python twin in framewalk.py is used. Everything else is in pyproject.toml.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway_postgres._framewalk",
            sources=["plugins/postgres/_framewalk.c"],
            optional=True,
        )
    ]
)
