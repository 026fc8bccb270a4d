"""python -m ckptio bench: the benchmark, by section.

- harness: the generated checkpoints, the child-process timing and memory
  sampling every section uses, main() (``ckptio bench [--only ...]``) and
  the load section
- save, mmcv, http, dcp, asyncsave: one section each, each with
  measure(path, runs) -> dict and render(dict) -> str
"""


def main(argv=None):
    from .harness import main as run

    return run(argv)
