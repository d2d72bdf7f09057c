# Builds the two C helpers of the Postgres relay: the frame walker
# (plugins/postgres/_framewalk.c) and the per-chunk lane of unmirrored and dark
# sessions (plugins/postgres/_lane.c). optional=True: where no compiler is at
# hand the install still succeeds, and the relay's Python does their work
# (framewalk.py's twin; relay.py itself for the lane). Everything else is in pyproject.toml.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway_postgres._framewalk",
            sources=["plugins/postgres/_framewalk.c"],
            depends=["plugins/postgres/_frames.h"],
            optional=True,
        ),
        Extension(
            "gateway_postgres._lane",
            sources=["plugins/postgres/_lane.c"],
            depends=["plugins/postgres/_frames.h"],
            optional=True,
        ),
    ]
)
