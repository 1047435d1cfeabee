"""--prompts-file as its users write it: JSON Lines by the name's ending in any case, a BOM, and the mistakes that
read as something else (a JSON Lines file under another name, a key given twice, a lone surrogate, no ids)."""
import pytest

from spmd.errors import UserError
from spmd.prompts import read_prompts_file


@pytest.mark.parametrize("name", ["p.jsonl", "P.JSONL", "p.ndjson"])
def test_json_lines_by_the_names_ending_in_any_case(tmp_path, name):
    (tmp_path / name).write_text('{"prompt": "a", "steps": 3}\n\n{"prompt_ids": [1, 2]}\n')
    got = read_prompts_file(tmp_path / name)
    assert [(p.text, p.ids, p.steps) for p in got] == [("a", None, 3), ("", (1, 2), None)]


def test_a_bom_is_not_part_of_the_first_prompt(tmp_path):
    (tmp_path / "p.txt").write_bytes("\ufeffOnce upon\nA dog\n".encode())
    (tmp_path / "p.jsonl").write_bytes('\ufeff{"prompt": "x"}\n'.encode())
    assert [p.text for p in read_prompts_file(tmp_path / "p.txt")] == ["Once upon", "A dog"]
    assert [p.text for p in read_prompts_file(tmp_path / "p.jsonl")] == ["x"]


@pytest.mark.parametrize("name, text, message", [
    ("p.json", '{"prompt": "a", "steps": 3}\n', r"p.json line 1 is a JSON object with a prompt, .*name the file "
                                                r"\*.jsonl"),
    ("p.jsonl", '{"prompt": "a", "prompt": "b"}\n', r"p.jsonl line 1: not JSON \(the key 'prompt' appears twice\)"),
    ("p.jsonl", '{"prompt": "lone \\ud800 here"}\n', r"p.jsonl line 1: \"prompt\" holds an unpaired surrogate"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt_ids": []}\n', r"p.jsonl line 2: \"prompt_ids\" is an empty list"),
    ("p.jsonl", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     r"p.jsonl line 1: not JSON this reads \(nested too deeply\)")])
def test_mistakes_are_named(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
        read_prompts_file(tmp_path / name)


def test_a_plain_file_may_hold_braces_that_are_no_prompt_object(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "p.txt").write_text('{"name": "x"}\n{not json\n')
    assert [p.text for p in read_prompts_file(tmp_path / "p.txt")] == ['{"name": "x"}', "{not json"]
    (tmp_path / "deep.txt").write_text(f"{deep}\n")  # (JSON too deep to read is no prompt object either)
    assert [p.text for p in read_prompts_file(tmp_path / "deep.txt")] == [deep]
