import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.keys import KEY_BYTES, KeyChain, Namespace, chunk_keys

NS = Namespace("llama-3.1-8b", "bfloat16", 32, 8, 128, 0, 1)
CS = 16


@pytest.mark.parametrize("hash_name", ["blake3", "xxh3_128"])
def test_only_full_chunks_get_keys(hash_name):
    assert len(chunk_keys(NS, list(range(CS * 3 - 1)), CS, hash_name)) == 2
    keys = chunk_keys(NS, list(range(CS * 3)), CS, hash_name)
    assert len(keys) == 3
    assert all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 3


tokens = st.lists(st.integers(0, 5), min_size=0, max_size=6 * CS)


@settings(max_examples=200, deadline=None)
@given(a=tokens, b=tokens, hash_name=st.sampled_from(["blake3", "xxh3_128"]))
def test_prefix_property(a, b, hash_name):
    """Key i agrees exactly when the tokens up to the end of chunk i agree."""
    ka, kb = chunk_keys(NS, a, CS, hash_name), chunk_keys(NS, b, CS, hash_name)
    for i in range(min(len(ka), len(kb))):
        same_prefix = a[: (i + 1) * CS] == b[: (i + 1) * CS]
        assert (ka[i] == kb[i]) == same_prefix


@pytest.mark.parametrize("field,value", [
    ("model", "other-model"), ("kv_dtype", "float16"), ("num_layers", 31), ("num_kv_heads", 4),
    ("head_size", 64), ("tp_rank", 1), ("tp_size", 2), ("format_version", 2), ("extra", "lora=7"),
])
def test_namespace_separation(field, value):
    toks = np.arange(CS * 4) % 7
    other = dataclasses.replace(NS, **{field: value})
    assert not set(chunk_keys(NS, toks, CS)) & set(chunk_keys(other, toks, CS))


def test_field_boundaries_do_not_alias():
    # "ab" + "c" must not collide with "a" + "bc" across two string fields.
    a = Namespace("ab", "c", 1, 1, 1)
    b = Namespace("a", "bc", 1, 1, 1)
    assert a.seed() != b.seed()


def test_input_types_agree_and_bad_tokens_fail():
    toks = list(range(100, 100 + CS * 2))
    ref = chunk_keys(NS, toks, CS)
    assert chunk_keys(NS, np.array(toks, dtype=np.int64), CS) == ref
    assert chunk_keys(NS, torch.tensor(toks), CS) == ref
    assert chunk_keys(NS, np.array(toks, dtype=np.int32), CS, max_chunks=1) == ref[:1]
    assert chunk_keys(NS, tuple(toks), CS) == ref
    assert chunk_keys(NS, [2**32 - 1] * CS, CS) == chunk_keys(NS, np.full(CS, 2**32 - 1, dtype=np.uint32), CS)
    for bad in ([-1] * CS, [2**32] * CS, [1.5] * CS, [[1, 2]] * CS):
        with pytest.raises(ValueError):
            chunk_keys(NS, bad, CS)


def test_keychain_extends_incrementally():
    toks = list(np.random.default_rng(0).integers(0, 1000, CS * 5))
    chain = KeyChain(NS, CS)
    assert chain.extend(toks[: CS + 3]) == chunk_keys(NS, toks[: CS + 3], CS)
    assert chain.extend(toks) == chunk_keys(NS, toks, CS)
    assert chain.extend(toks[: 2 * CS]) == chunk_keys(NS, toks, CS)[:2]
    assert chain.extend(toks, max_chunks=3) == chunk_keys(NS, toks, CS)[:3]


def test_keychain_starts_over_when_the_tokens_are_not_the_ones_hashed():
    """The scheduler keeps one chain per request id; tokens that do not continue what was
    hashed (an id reused for another prompt) must never get the old prompt's keys."""
    rng = np.random.default_rng(1)
    a = list(rng.integers(0, 1000, CS * 3))
    b = list(rng.integers(0, 1000, CS * 4))
    chain = KeyChain(NS, CS)
    assert chain.extend(a) == chunk_keys(NS, a, CS)
    assert chain.extend(b) == chunk_keys(NS, b, CS)
    assert chain.extend(b[: CS]) == chunk_keys(NS, b, CS)[:1]
    assert chain.extend(a[: 2 * CS]) == chunk_keys(NS, a, CS)[:2]  # shorter than the chain: computed apart
    assert chain.extend(b) == chunk_keys(NS, b, CS)


def test_same_keys_in_another_process():
    toks = list(range(3 * CS))
    code = (
        "from kvtier.keys import Namespace, chunk_keys;"
        f"print(','.join(k.hex() for k in chunk_keys(Namespace(*{dataclasses.astuple(NS)!r}), {toks!r}, {CS})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out.split(",") == [k.hex() for k in chunk_keys(NS, toks, CS)]


@pytest.mark.parametrize("hash_name,want", [
    ("blake3", ["9a87d8ad34d238a1dfa775160f9dfb69", "5705051f86b7e877569fbf8ac7bb6f41"]),
    ("xxh3_128", ["bf30e5894f34a55b43164ec85f5e3385", "1868ca441f5088934583268ee7a22e42"]),
])
def test_keys_do_not_change_between_versions(hash_name, want):
    """Chunks on disk and in Redis outlive the process that wrote them: a release that computed other
    keys for the same tokens would miss every chunk stored before it, silently. A change of the key
    format must change these values on purpose (and say so in the release notes)."""
    assert [k.hex() for k in chunk_keys(NS, list(range(40)), CS, hash_name)] == want
