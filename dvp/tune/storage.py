"""A sweep's storage: a folder (local, or shared by every node: NFS) or a URI Ray's storage reads (s3://, gs://,
through pyarrow, as Ray does; an S3-compatible server through AWS_ENDPOINT_URL, e.g. MinIO or moto).

    write_text("s3://bucket/sweeps/s/best.json", text)
    view = stage(spec, Path(tmp))        # a local copy of a remote sweep folder that dvp-report reads
    upload(view / "report", f"{spec.sweep_dir}/report")

With remote storage the trials' dvp run dirs stay on the nodes that ran them; what reaches storage is Tune's
records (experiment state, each trial's params.json and result.json) and each trial's registered checkpoints
(`trials/<trial id>/checkpoint_*`), which carry the run dir's config.yaml and metrics.jsonl with the weights,
and the stop.json of a trial that ended by itself.
`stage` downloads the records and, per trial, the newest checkpoint's config.yaml and metrics.jsonl (not the
weights) as `runs/<trial id>/`: the sweep folder as a local sweep leaves it, whatever node each trial ran on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dvp.core.paths import replace_atomically

RUN_RECORDS = ("config.yaml", "metrics.jsonl")
"""What `stage` takes of a trial's newest checkpoint into its runs/<trial id>/ (the report's inputs), with the
`trials/<trial id>/stop.json` its rank 0 uploads when it ends by itself (after its last checkpoint)."""
SKIPPED = ("wandb",)
"""Folders of a trial's Tune folder that `stage` leaves in storage (wandb's offline runs: `wandb sync` reads them
there)."""


def is_remote(location: str) -> bool:
    return "://" in location


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(uri)


def write_text(location: str, text: str) -> None:
    """Write a small file to a path (atomically) or a storage URI."""
    if not is_remote(location):
        replace_atomically(Path(location), lambda tmp: tmp.write_text(text))
        return
    fs, path = _fs(location)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(location: str) -> str | None:
    """A small file's text, None when there is none."""
    if not is_remote(location):
        return Path(location).read_text() if Path(location).is_file() else None
    import pyarrow.fs
    fs, path = _fs(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _files(uri: str) -> tuple[Any, str, list[str]]:
    """The storage's file system, the folder's path in it, and every file under it (relative paths)."""
    import pyarrow.fs
    fs, root = _fs(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return fs, root, [i.path[len(root):].lstrip("/") for i in infos if i.type == pyarrow.fs.FileType.File]


def _keep(relative: str, newest: dict[str, str]) -> str | None:
    """Where a file of the remote sweep folder goes in the local view (None: left in storage)."""
    parts = relative.split("/")
    if parts[0] == "trials":                        # trials/<id>/checkpoint_*/<run dir file>
        if len(parts) == 3 and parts[2] == "stop.json":
            return f"runs/{parts[1]}/stop.json"
        if len(parts) >= 4 and parts[2] == newest.get(parts[1]) and "/".join(parts[3:]) in RUN_RECORDS:
            return "/".join(["runs", parts[1], *parts[3:]])
        return None
    if parts[0] in ("report", "runs") or any(p in SKIPPED for p in parts[1:-1]):
        return None
    return relative


def newest_checkpoints(relatives: list[str]) -> dict[str, str]:
    """trial id -> the name of its newest registered checkpoint folder (checkpoint_<index>, Ray's numbering)."""
    newest: dict[str, str] = {}
    for rel in relatives:
        parts = rel.split("/")
        if len(parts) >= 4 and parts[0] == "trials" and parts[2].startswith("checkpoint_") and (
                parts[1] not in newest or parts[2] > newest[parts[1]]):
            newest[parts[1]] = parts[2]
    return newest


def stage(sweep_uri: str, local: Path) -> tuple[Path, dict[str, str]]:
    """Download what the report reads of the remote sweep folder `sweep_uri` into `local` (see the module
    docstring); returns `local` and trial id -> the URI of its newest checkpoint."""
    fs, root, relatives = _files(sweep_uri)
    newest = newest_checkpoints(relatives)
    for rel in relatives:
        target = _keep(rel, newest)
        if target is None:
            continue
        (local / target).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{rel}") as f:
            (local / target).write_bytes(f.read())
    return local, {t: f"{sweep_uri.rstrip('/')}/trials/{t}/{c}" for t, c in newest.items()}


def upload(folder: Path, uri: str) -> None:
    """Copy a local folder's files to `uri` (the report into the remote sweep folder)."""
    fs, root = _fs(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        fs.create_dir(f"{root}/{rel}".rpartition("/")[0], recursive=True)
        with fs.open_output_stream(f"{root}/{rel}") as f:
            f.write(path.read_bytes())
