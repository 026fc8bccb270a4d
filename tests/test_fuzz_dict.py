"""The fuzzers' dictionary (tests/fuzz/ckptio.dict) is written from the
installed torch by tests/fuzz/make_dict.py; a torch with new allowlisted
globals, storage types or rebuild functions must bring them into it."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fuzz"))
import make_dict  # noqa: E402


def test_dictionary_is_up_to_date():
    r = subprocess.run([sys.executable, os.path.join(HERE, "fuzz", "make_dict.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dictionary_names_every_allowlisted_global_and_every_opcode():
    text = open(make_dict.PATH).read()
    for full in torch._weights_only_unpickler._get_allowed_globals():
        module, _, name = full.rpartition(".")
        assert make_dict._escape(f"c{module}\n{name}\n".encode()) in text, full
    for f in torch._weights_only_unpickler._tensor_rebuild_functions():
        assert f.__name__ in text
    import pickletools
    for op in pickletools.opcodes:
        assert make_dict._escape(op.code.encode("latin-1")) in text, op.name


def test_dictionary_parses_as_libfuzzer_reads_it():
    # name="value" with \\xNN escapes only; libFuzzer rejects the whole file otherwise
    import re
    for line in open(make_dict.PATH).read().splitlines():
        if line.startswith("#") or not line:
            continue
        assert re.fullmatch(r'[A-Za-z0-9_]+="(?:[ -!#-\[\]-~]|\\x[0-9a-f]{2}|\\\\|\\")*"', line), line
