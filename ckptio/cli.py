"""The ckptio command line (console script `ckptio`, or `python -m ckptio`)."""
import argparse
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ckptio", description="PyTorch checkpoint tools")
    parser.add_argument("command", choices=["bench"], help="bench: measure loading and saving")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from . import bench

        return bench.main(rest)
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
