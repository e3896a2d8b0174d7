"""The one seam to upstream internals: every name we rely on is there, and only the seam
reaches for internals."""

import ast
from pathlib import Path

import rescomp_modifiers.upstream as upstream

PACKAGE = Path(upstream.__file__).parent

#: modules of llm-compressor and compressed-tensors that are their public API: anything
#: else is internal and must be imported through rescomp_modifiers/upstream.py
PUBLIC_MODULES = {
    "llmcompressor", "llmcompressor.core", "llmcompressor.modifiers.gptq",
    "llmcompressor.modifiers.quantization", "compressed_tensors",
    "compressed_tensors.quantization",
}


def test_every_upstream_name_we_rely_on_is_there_with_our_parameters():
    assert upstream.contract_violations() == []


def test_a_changed_signature_is_reported_by_name(monkeypatch):
    def renamed(inputs, module, hessian, num_samples):  # "inp" renamed upstream
        return None

    contract = [(what, renamed if "accumulate_hessian" in what else target, parameters)
                for what, target, parameters in upstream.CONTRACT]
    monkeypatch.setattr(upstream, "CONTRACT", contract)
    problems = upstream.contract_violations()
    assert len(problems) == 1
    assert "llm-compressor 0.14.0.1" in problems[0]
    assert "accumulate_hessian changed its parameters: no inp" in problems[0]


def test_a_vanished_attribute_is_reported_by_name(monkeypatch):
    monkeypatch.delattr(upstream.CalibrationPipeline, "_infer_pipeline")
    problems = upstream.contract_violations()
    assert any("CalibrationPipeline._infer_pipeline is gone" in p for p in problems)


def test_only_the_seam_imports_upstream_internals():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "upstream.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}: {name}" for name in names
                          if name.split(".")[0] in ("llmcompressor", "compressed_tensors")
                          and name not in PUBLIC_MODULES]
    assert offenders == []
