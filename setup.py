"""Build reservd: generate the gRPC stubs from proto/ and compile the Cython counter table and
finished-record table in ext/.

RESERVD_DEBUG=1 compiles the table with its debug invariant checks (see ext/reservd/_ctable.pyx).
"""
import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO = ROOT / "proto"
SRC = ROOT / "src"


def generate_protos() -> None:
    """Generate reservd/v1/*_pb2*.py next to the sources (they are build outputs, not tracked)."""
    from grpc_tools import protoc
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted(PROTO.rglob("*.proto")):
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{include}",
            f"--python_out={SRC}",
            f"--pyi_out={SRC}",
            f"--grpc_python_out={SRC}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPy(build_py):
    def run(self):
        generate_protos()
        super().run()


class BuildExt(build_ext):
    def run(self):
        generate_protos()
        super().run()


def extensions():
    from Cython.Build import cythonize

    debug = os.environ.get("RESERVD_DEBUG") == "1"
    # Without a C compiler the install still works on the pure-Python twins (reservd._pytable,
    # reservd._pyfinished, reservd.channelpolicy.ats_values).
    exts = [
        Extension(
            f"reservd.{name}",
            [f"ext/reservd/{name}.pyx"],
            # blake2b.h: the ids' hash (reservd._cfinished), inlined where a Reserve probes.
            depends=["ext/reservd/blake2b.h"],
            include_dirs=["ext/reservd"],
            define_macros=[("RESERVD_DEBUG", "1")] if debug else [],
            extra_compile_args=["-O2"],
            optional=True,
        )
        # _atsvalues: every channel's ats for one SKU in one call (channelpolicy.ats_values's twin).
        # _mirrorargs: a mirrored row's channel fields (mirrorwrite.fields_text's and
        # mirrorshown.channel_delta's twins).
        for name in ("_ctable", "_cfinished", "_atsvalues", "_mirrorargs")
    ]
    return cythonize(
        exts,
        include_path=["ext"],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )


setup(ext_modules=extensions(), cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
