"""The lean GGUF header reader against the gguf package's own reader, and its refusal of damaged files."""
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, quants as gguf_quants

from spmd.errors import UserError
from spmd.gguf_file import GGUFFile
from spmd.run import EMBEDDED_MODEL
from spmd.synth import Shape, write_model


def write_every_type(path):
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁wörld")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strs", ["a", "", "ünï"])
    w.add_tensor("m.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("v.weight", np.ones(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("make", [write_every_type,
                                  lambda p: write_model(p, Shape(arch="qwen2", tied=True), "Q4_0", seed=1),
                                  lambda p: write_model(p, Shape(), "Q8_0", seed=1)])
def test_metadata_and_tensors_equal_the_gguf_packages_reader(tmp_path, make):
    path = make(tmp_path / "m.gguf")
    ours, theirs = GGUFFile(path), GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert ours.keys() == keys
    for k in keys:
        expected = theirs.fields[k].contents()
        assert ours.meta(k) == pytest.approx(expected) if isinstance(expected, float) else ours.meta(k) == expected
    for t in theirs.tensors:
        info = ours.info(t.name)
        assert (info.qtype, info.offset, info.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes)
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M"])
def test_an_embedding_lookup_gives_the_rows_the_gguf_package_dequantises(tmp_path, qtype):
    path = write_model(tmp_path / "m.gguf", Shape(dim=256, vocab=300), qtype, seed=1)
    theirs = next(t for t in GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    whole = gguf_quants.dequantize(theirs.data, theirs.tensor_type).reshape(300, 256)
    ids = [5, 0, 5, 299, 17]  # repeated and out of order: one vectorised dequantisation of the rows
    got = GGUFFile(path).lookup("token_embd.weight", ids)
    assert got.dtype == np.float32 and got.shape == (5, 256)
    np.testing.assert_array_equal(got, whole[ids].astype(np.float32))


def test_arrays_are_decoded_only_when_asked(tmp_path):
    f = GGUFFile(write_every_type(tmp_path / "m.gguf"))
    assert type(f._header.fields["t.strs"]).__name__ == "ArrayRef"
    assert f.meta("t.strs") == ["a", "", "ünï"]
    assert f.meta("absent", "default") == "default"


def test_every_truncation_and_garbage_is_one_clear_error(tmp_path):
    good = write_model(tmp_path / "m.gguf", Shape(), "F32", seed=0).read_bytes()
    rng = np.random.default_rng(0)
    cuts = sorted(set(rng.integers(0, len(good), 60).tolist()) | set(range(3000)))  # (every byte of the header's
    for n in cuts:                                                                  # start: its strings and arrays)
        (tmp_path / "cut.gguf").write_bytes(good[:n])
        with pytest.raises(UserError, match=r"is not a valid GGUF file \((no GGUF magic|the file ends within its "
                                            r"header|.* runs past the end of the file|truncated: tensor|.* cannot "
                                            r"fit in its \d+ bytes: it is truncated)"):
            GGUFFile(tmp_path / "cut.gguf")
    (tmp_path / "cut.gguf").write_bytes(Path(EMBEDDED_MODEL).read_bytes()[:40])  # (its counts: "implausible", once)
    with pytest.raises(UserError, match=r"\(74 tensors and \d+ metadata entries cannot fit in its 40 bytes: it is "
                                        r"truncated or damaged\)"):
        GGUFFile(tmp_path / "cut.gguf")
    for i in range(40):  # random bytes after a valid magic and version
        (tmp_path / "junk.gguf").write_bytes(good[:8] + rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
        with pytest.raises(UserError, match="is not a valid GGUF file"):
            GGUFFile(tmp_path / "junk.gguf")


def test_a_llama2c_checkpoint_as_model_says_how_to_convert_it(tmp_path):
    """A --model that is a llama2.c checkpoint (a consistent header and the bytes its arrays need) gets the
    spmd.convert command in its error; a file of other bytes, or a header whose arrays are cut short, does not."""
    import struct
    dim, hidden, layers, heads, kv, vocab, seq = 8, 16, 1, 2, 2, 10, 4
    floats = vocab * dim + layers * (2 * dim + 4 * dim * dim + 3 * dim * hidden) + dim
    header = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)
    for name, data, hinted in (("ckpt.bin", header + bytes(4 * floats), True),
                               ("short.bin", header + bytes(4 * floats - 4), False),
                               ("other.bin", b"not a model at all" * 10, False)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="is not a valid GGUF file") as e:
            GGUFFile(tmp_path / name)
        assert ("python -m spmd.convert llama2c" in str(e.value)) == hinted, str(e.value)


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_headers_load_or_give_a_user_error(tmp_path, seed):
    """1 to 4 random bytes of the header (metadata keys, types, values, lengths; the tensor index) changed, 100
    times a seed: opening the file, reading its config and tokenizer and encoding a text either works or raises
    the one-line UserError, never another exception (it found an unbounded string-array walk and byte tokens that
    are not <0xHH>)."""
    import random
    import warnings

    from spmd.config import read_config
    from spmd.tokenizer import load_tokenizer
    path = write_model(tmp_path / "m.gguf", Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128, vocab=300,
                                                  context=32), "Q8_0", 1)
    original = path.read_bytes()
    f = GGUFFile(path)
    end = f._header.data_offset
    f.close()
    rng = random.Random(seed)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(100):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(end)
            data[at] = rng.choice([0, 255, rng.randrange(256), data[at] ^ (1 << rng.randrange(8))])
        (tmp_path / "x.gguf").write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a NaN norm weight in a header-only check
                g = GGUFFile(tmp_path / "x.gguf")
                read_config(g)
                load_tokenizer(g).encode("hello world")
                g.close()
            outcomes["loaded"] += 1
        except UserError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 100


@pytest.mark.parametrize("value", [0, "32", 1 << 40, 3, 31, 48])
def test_an_alignment_that_is_not_a_power_of_two_is_one_line(tmp_path, value):
    w = GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    (w.add_string if isinstance(value, str) else w.add_uint64)("general.alignment", value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="not a valid GGUF file .general.alignment is"):
        GGUFFile(tmp_path / "a.gguf")


def split_model(folder):
    """One model written whole and split into 3 files of at most 8 tensors (llama.cpp's gguf-split, by the gguf
    package's writer): (the whole file, the first part)."""
    whole = write_model(folder / "whole.gguf", Shape(), "Q8_0", seed=1)
    return whole, write_model(folder / "m.gguf", Shape(), "Q8_0", seed=1, split=8)


def test_a_split_model_reads_as_the_whole_file(tmp_path):
    whole, first = split_model(tmp_path)
    assert first.name == "m-00001-of-00003.gguf"
    a, b = GGUFFile(whole), GGUFFile(first)
    assert len(b.shards) == 3 and {info.shard for info in b.tensors.values()} == {0, 1, 2}
    assert list(a.tensors) == list(b.tensors)
    for name, info in a.tensors.items():
        if len(info.shape) == 2:
            assert a.rows(name, 0, info.shape[0]).data.tobytes() == b.rows(name, 0, info.shape[0]).data.tobytes()
        else:
            np.testing.assert_array_equal(a.vector(name), b.vector(name))
    assert a.meta("llama.block_count") == b.meta("llama.block_count")
    assert b.nbytes == sum(p.stat().st_size for p in tmp_path.glob("m-*.gguf"))
    assert b.fingerprint() != a.fingerprint()  # (another layout of the bytes: a rank must open the same files)


def test_a_split_models_missing_or_misnamed_part_is_named(tmp_path):
    _, first = split_model(tmp_path)
    second = tmp_path / "m-00002-of-00003.gguf"
    with pytest.raises(UserError, match=r"m-00002-of-00003.gguf is part 2 of a model split into 3 files: give the "
                                        r"first \(.*m-00001-of-00003.gguf\)$"):
        GGUFFile(second)
    second.rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(UserError, match=r"m-00001-of-00003.gguf is the first of a model split into 3 files, and "
                                        r".*m-00002-of-00003.gguf is missing$"):
        GGUFFile(first)
    (tmp_path / "m-00003-of-00003.gguf").rename(second)  # part 3 where part 2 belongs
    with pytest.raises(UserError, match=r"m-00002-of-00003.gguf holds part 3 of a split model, not part 2 of "):
        GGUFFile(first)
    renamed = first.rename(tmp_path / "model.gguf")
    with pytest.raises(UserError, match=r"model.gguf is the first of a model split into 3 files, but its name is "
                                        r"not NAME-00001-of-00003.gguf"):
        GGUFFile(renamed)


def patched_offset(model, path, name, offset):
    """A copy of `model` whose tensor `name` has the data offset `offset` in its tensor info (the u64 after its
    name, dimensions and type)."""
    import struct

    from test_kquant import tensor_type_at
    g = GGUFFile(str(model))
    info = g.info(name)
    g.close()
    data = bytearray(Path(model).read_bytes())
    at = tensor_type_at(data, name) + 4  # (the offset follows the type)
    assert struct.unpack_from("<Q", data, at)[0] == info.offset - g.shards[0].header.data_offset
    struct.pack_into("<Q", data, at, offset)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("change, said", [(lambda o, other: o + 1, "does not start on the file's alignment of 32"),
                                          (lambda o, other: other, "overlap in the file")])
def test_a_tensor_offset_that_is_off_its_alignment_or_overlaps_another_is_one_line(tmp_path, change, said):
    """Damaged offsets used to load, and the run went on to wrong numbers (NaN logits, or text)."""
    from spmd.gguf_file import GGUFFile
    model = write_model(tmp_path / "m.gguf", Shape(), "Q8_0", seed=1)
    g = GGUFFile(str(model))
    base = g.shards[0].header.data_offset
    embd, norm = g.info("token_embd.weight").offset - base, g.info("output_norm.weight").offset - base
    g.close()
    bad = patched_offset(model, tmp_path / "bad.gguf", "output_norm.weight", change(norm, embd))
    with pytest.raises(UserError, match=said):
        GGUFFile(str(bad))
