"""python -m engine.kernels build [--force] | info: compile the fused W2R kernel for this machine, or say where it is."""

from __future__ import annotations

import argparse
import sys

from engine.errors import BssanError


def main(argv: list[str] | None = None) -> int:
    from engine.kernels import SOURCE, build, compiler, library_path, load_library

    parser = argparse.ArgumentParser(prog="python -m engine.kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile w2r_grid.c with -O3 -march=native into the kernel cache (once)")
    b.add_argument("--force", action="store_true", help="rebuild even when this machine's build exists")
    b.add_argument("--optional", action="store_true", help="a build that cannot be made (no compiler, a compile error) "
                   "is a warning and exit 0: the engine then scores with its ONNX graphs (CMake's kernel target)")
    sub.add_parser("info", help="the library's path, whether it is built, its vector width")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            path = build(force=args.force)
            lib = load_library(path)
            print(f"{path} (vector width {lib.bssan_w2r_simd_width()} floats, block {lib.bssan_w2r_block_rows()} captions)")
        else:
            path = library_path()
            if path.is_file():
                lib = load_library(path)
                print(f"built: {path} (vector width {lib.bssan_w2r_simd_width()} floats)")
            else:
                print(f"not built: {path} (source {SOURCE}; compiler {compiler() or 'none found'}); "
                      f"python -m engine.kernels build")
    except BssanError as exc:
        if getattr(args, "optional", False):
            print(f"warning: {exc}; the engine scores with its ONNX graphs", file=sys.stderr)
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
