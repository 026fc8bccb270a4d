"""python -m ckptio bench: the benchmark, by section.

- harness: the generated checkpoints, the child-process timing and memory
  sampling every section uses, and main() (``ckptio bench [--only ...]``)
- load, save, mmcv, http, dcp, asyncsave, cold: one section each, each with
  measure(path, runs) -> dict and render(dict) -> str
"""


def main(argv=None):
    from .harness import main as run

    return run(argv)
