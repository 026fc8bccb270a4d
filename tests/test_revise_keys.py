"""ckptio._native.revise_keys against mmcv's loop of re.sub, the oracle."""

import re
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptio  # noqa: F401  (configures the extension)
from ckptio import _native


def oracle(state_dict, revise_keys):
    """mmcv 1.7.2's load_checkpoint loop, verbatim in meaning."""
    for p, r in revise_keys:
        state_dict = OrderedDict({re.sub(p, r, k): v for k, v in state_dict.items()})
    return state_dict


def outcome(fn, *args):
    try:
        result = fn(*args)
    except Exception as exc:  # the oracle's exception is part of the answer
        return ("raised", type(exc), str(exc))
    assert type(result) is OrderedDict
    return ("ok", list(result.items()))


def same(state_dict, revise_keys):
    want = outcome(oracle, state_dict, revise_keys)
    got = outcome(_native.revise_keys, state_dict, revise_keys)
    assert got == want
    return got


KEY_CHARS = "ab.m_-\\^$*+?()[]{}|#é0 \n"
keys = st.text(alphabet=KEY_CHARS, max_size=12)
state_dicts = st.lists(st.tuples(keys, st.integers()), max_size=8).map(OrderedDict)
literal_prefixes = st.text(alphabet=KEY_CHARS, max_size=5).map(lambda s: "^" + re.escape(s))
raw_patterns = st.text(alphabet=KEY_CHARS + "\\dwsA1", max_size=6)
anchored_raw = raw_patterns.map(lambda s: "^" + s)
patterns = st.one_of(
    literal_prefixes,
    raw_patterns,
    anchored_raw,
    st.sampled_from([r"^module\.", r"^", r"", r"a*", r"(a)\.", r"\.", r"$", r"^b|m"]),
)
replacements = st.one_of(
    st.text(alphabet="ab.xé_-$ ", max_size=5),
    st.sampled_from([r"\1", r"\g<0>", "\\", r"\n", r"x\\y", "backbone."]),
)
rule_lists = st.lists(st.tuples(patterns, replacements), max_size=3)


@settings(max_examples=400, deadline=None)
@given(state_dicts, rule_lists)
def test_matches_re_sub_loop(state_dict, revise_keys):
    same(state_dict, revise_keys)


@settings(max_examples=200, deadline=None)
@given(state_dicts, literal_prefixes, st.text(alphabet="ab.x_ é", max_size=5))
def test_fast_path_prefixes(state_dict, pattern, repl):
    same(state_dict, [(pattern, repl)])


def test_mmcv_default_and_prefix_add():
    sd = OrderedDict([("module.backbone.w", 1), ("head.b", 2), ("module.", 3), ("", 4)])
    assert same(sd, [(r"^module\.", "")])[1] == [("backbone.w", 1), ("head.b", 2), ("", 4)]
    same(sd, [(r"^", "backbone.")])
    same(sd, [(r"^module\.", ""), (r"^", "backbone.")])


def test_collisions_keep_first_position_last_value():
    sd = OrderedDict([("module.a", 1), ("b", 2), ("a", 3)])
    kind, items = same(sd, [(r"^module\.", "")])
    assert items == [("a", 3), ("b", 2)]


def test_metadata_kept_and_input_untouched():
    sd = OrderedDict([("module.a", 1)])
    sd._metadata = OrderedDict({"": {"version": 1}})
    out = _native.revise_keys(sd, [(r"^module\.", "")])
    assert out._metadata is sd._metadata
    assert list(sd) == ["module.a"]
    plain = {"module.a": 1}
    assert not hasattr(_native.revise_keys(plain, [("^", "x")]), "_metadata")


def test_ordered_dict_order_after_move_to_end():
    sd = OrderedDict([("a", 1), ("b", 2), ("c", 3)])
    sd.move_to_end("a")
    assert same(sd, [("^", "p.")])[1] == [("p.b", 2), ("p.c", 3), ("p.a", 1)]


def test_other_pattern_kinds():
    sd = OrderedDict([("Module.a", 1), ("module.b", 2)])
    same(sd, [(re.compile(r"^module\.", re.IGNORECASE), "")])
    same(sd, [(r"^(\w+)\.", lambda m: m.group(1).upper() + "/")])
    same(sd, [(rb"^module", b"")])  # bytes pattern on str keys: TypeError
    same(sd, [(r"^module\.", b"")])
    same(OrderedDict([(1, "x"), ("module.a", 2)]), [(r"^module\.", "")])  # int key
    same(OrderedDict([((1, 2), "x")]), [(r"^", "p")])


def test_invalid_pattern_fails_only_when_used():
    assert _native.revise_keys(OrderedDict(), [("(", "")]) == OrderedDict()
    same(OrderedDict(a=1), [("(", "")])
    same(OrderedDict(a=1), [("^a", "\\")])  # bad replacement template
    same(OrderedDict(a=1), [("^\\", "")])  # trailing backslash


def test_non_mapping_and_bad_pairs():
    with pytest.raises(AttributeError, match="items"):
        _native.revise_keys([("a", 1)], [("^", "")])
    with pytest.raises(TypeError):
        _native.revise_keys({}, [("^",)])
    with pytest.raises(TypeError):
        _native.revise_keys({}, 5)


def test_str_subclass_keys_take_the_general_path():
    class Key(str):
        pass

    sd = OrderedDict([(Key("module.a"), 1), (Key("b"), 2)])
    out = _native.revise_keys(sd, [(r"^module\.", "")])
    assert list(out.items()) == list(oracle(sd, [(r"^module\.", "")]).items())


def test_replacement_that_changes_the_dict_fails_as_mmcv():
    def grow(sd):
        def repl(match):
            sd["added"] = 0
            return "x"

        return repl

    a, b = {"k1": 1, "k2": 2}, {"k1": 1, "k2": 2}
    with pytest.raises(RuntimeError) as want:
        oracle(a, [("k", grow(a))])
    with pytest.raises(RuntimeError) as got:
        _native.revise_keys(b, [("k", grow(b))])
    assert str(got.value) == str(want.value)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.text(max_size=10), st.integers()), max_size=6).map(OrderedDict),
    st.text(max_size=4),
    st.text(max_size=4).filter(lambda r: "\\" not in r),
    st.text(max_size=4),
)
def test_any_unicode_prefixes(state_dict, literal, repl, prefix):
    """Keys and literals from all of Unicode (surrogates, NUL, astral)."""
    keys = OrderedDict((prefix + k, v) for k, v in state_dict.items())
    same(keys, [("^" + re.escape(prefix + literal), repl), ("^" + re.escape(prefix), repl)])
