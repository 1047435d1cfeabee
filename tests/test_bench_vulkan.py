"""scripts/bench_vulkan.py's --against: the trees it measures, and the table rows each run prints (the row it
writes and the pattern it reads them with agree; a row of the verbose lines above the table does not match)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_vulkan  # noqa: E402


def test_a_table_row_reads_back_its_type_backend_and_speeds():
    row = {"qtype": "Q4_K_M", "backend": "vulkan (NVIDIA H100 80GB HBM3, int8)", "prompt_tps": 4602.34,
           "decode_tps": 283.81, "ms_per_token": 3.5237, "gpu_ms": None, "outside_ms": 0.0177, "weights_mb": 3716.5,
           "gbs_gpu": 1059.9, "roofline_gpu": 0.3164}
    m = bench_vulkan.TABLE_ROW.match(bench_vulkan.table_row(row))
    assert m and (m[1], m[2].strip(), float(m[3]), float(m[4])) == ("Q4_K_M", row["backend"], 4602.3, 283.8)
    cpu = dict(row, qtype="Q8_0", backend="cpu (numba, 2 threads)", prompt_tps=12.0, decode_tps=7.25)
    m = bench_vulkan.TABLE_ROW.match(bench_vulkan.table_row(cpu))
    assert m and (m[1], m[2].strip(), float(m[3]), float(m[4])) == ("Q8_0", "cpu (numba, 2 threads)", 12.0, 7.2)
    verbose = "Q4_0 vulkan (NVIDIA H100 80GB HBM3): prompt 3452.3 tok/s (5.13 ms of it the host's ...), decode 276.9"
    assert bench_vulkan.TABLE_ROW.match(verbose) is None


def test_a_tree_to_measure_is_a_folder_holding_one_or_a_git_revision(tmp_path):
    """--against's REV: a folder with the script in it is measured where it lies; anything else is a revision of
    this checkout, exported, and one that does not exist is one line naming it."""
    (tmp_path / "tree" / "scripts").mkdir(parents=True)
    (tmp_path / "tree" / "scripts" / "bench_vulkan.py").write_text("")
    assert bench_vulkan.exported(str(tmp_path / "tree"), tmp_path / "unused") == (tmp_path / "tree").resolve()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(SystemExit, match="^--against no-such-revision-here: "):
        bench_vulkan.exported("no-such-revision-here", tmp_path / "x")


FAKE = """import json, sys
from pathlib import Path
with open(Path(__file__).parent / "argv.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print("Q4_0  vulkan (a GPU)  {prompt}.0  {decode}.0  1.000  1.000  0.010  10.0  1.0  10%")
if "--llama-bench" in sys.argv:
    print("llama.cpp CUDA (its figures) on the same files, and spmd's ratio:")
    print("Q4_0  f32  prompt  2000.0 tok/s (spmd 0.50x)")
"""


def test_llama_bench_runs_once_beside_this_trees_last_run(tmp_path, monkeypatch, capsys):
    """--against with --llama-bench: llama.cpp's figures are printed (the runs' output was dropped), from one run of
    it beside this tree's last run, not one a tree and round; the runs' speeds are read from each tree."""
    trees = {}
    for name, prompt, decode in (("this", 1000, 100), ("other", 900, 90)):
        (tmp_path / name / "scripts").mkdir(parents=True)
        (tmp_path / name / "scripts" / "bench_vulkan.py").write_text(FAKE.format(prompt=prompt, decode=decode))
        trees[name] = tmp_path / name
    llama = tmp_path / "llama-bench"
    llama.write_text("")
    llama.chmod(0o755)
    monkeypatch.setattr(bench_vulkan, "ROOT", trees["this"])
    argv = ["--against", str(trees["other"]), "--rounds", "2", "--llama-bench", str(llama), "--shape", "llama2-7b"]
    monkeypatch.setattr(sys, "argv", ["bench_vulkan.py", *argv])
    bench_vulkan.main()
    out = capsys.readouterr().out
    runs = {name: [json.loads(line) for line in (tree / "scripts" / "argv.jsonl").read_text().splitlines()]
            for name, tree in trees.items()}
    assert runs["other"] == [["--shape", "llama2-7b", "--rounds", "1"]] * 2
    assert runs["this"] == [["--shape", "llama2-7b", "--rounds", "1"],
                            ["--shape", "llama2-7b", "--rounds", "1", "--llama-bench", str(llama)]]
    assert "decode 90.0 / 90.0 (1.111x)  prompt 900.0 / 900.0 (1.111x)" in out
    assert "llama.cpp CUDA (its figures)" in out and "Q4_0  f32  prompt  2000.0 tok/s (spmd 0.50x)" in out
