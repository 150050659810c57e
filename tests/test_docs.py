"""The Python snippet of docs/architecture.md runs as written."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_architecture_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    text = (ROOT / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    code = blocks[0].replace('"configs/', f'"{ROOT}/configs/')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/architecture.md", "exec"), {})
    assert "torch.Size([2, 10])" in capsys.readouterr().out
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
