"""Every flag with odd values (non-ASCII digits, undecodable bytes, NUL, huge and non-finite numbers, empty and
blank text, stray layout characters), in this process: each run either works or ends with exactly one error line,
never a traceback (a bug there calls MPI_Abort and takes the test run down, which fails it all the same)."""
import contextlib
import io

import pytest

from spmd.run import run
from spmd.synth import Shape, write_model

ODD = ["\u00b2", "\u0663", "-1", "0", "1e999", "nan", "inf", "", " ", "\udcff", "99999999999999999999", "1,2", "x",
       "\u0663:1", "1:\u00b2", "1*", "*", "@", "1@", "1@0", "0.0", "1e-400", "\x00", "\ufb01"]
FLAGS = ["--threads", "--gpu", "--ratios", "--steps", "--seed", "--temperature", "--top-k", "--top-p", "--backend",
         "--allreduce", "--sequences", "--prompt", "--prompts-file", "--prompt-ids", "--tokenizer", "--output",
         "--control-socket", "--migrate-weights"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    shape = Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128, vocab=512, context=32)
    return str(write_model(tmp_path_factory.mktemp("fuzz") / "m.gguf", shape, "Q8_0", 1))


@pytest.mark.parametrize("flag", FLAGS)
def test_odd_flag_values_work_or_give_one_line(model, flag):
    for value in ODD:
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run(["--model", model, "--steps", "2", "--control-socket", "none", flag, value])
            except SystemExit as e:
                code = e.code
        text = err.getvalue()
        assert "Traceback" not in text, (flag, value, text)
        if code not in (0, None):
            assert len([line for line in text.splitlines() if "rror" in line]) == 1, (flag, value, text)
