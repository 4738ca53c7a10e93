"""Hugging Face Hub sources: `hf://ORG/NAME[@REVISION][/SUBFOLDER]` -> local model paths.

`huggingface_hub` owns the cache (`models--ORG--NAME/{blobs,refs,snapshots}`) and every download;
this module only decides which files a source needs and names the models.

* The cache comes first: a source whose files are all cached is read from the cache without any
  network call (so a cached branch is not refreshed: name a commit, or download it anew).
  `HF_HUB_OFFLINE=1` (read by `huggingface_hub`) forbids the network altogether; then an uncached
  source is a CheckpointError saying how to download it. What a cached snapshot holds is known
  from the tree listing huggingface_hub keeps beside it (2.x), else from the files on disk.
* Otherwise only the files a model needs are downloaded: `adapter_config.json` and
  `adapter_model.safetensors`, `model.safetensors`, or `model.safetensors.index.json` and the
  shards it lists; never pickles, never other weight variants of the repository.
* A glob in the repository part (`hf://ORG/prefix-*`) matches repositories in the local cache (from
  `scan_cache_dir`); a glob in the subfolder part (`hf://ORG/NAME/adapters/*`) matches folders or
  `*.safetensors` files of the snapshot, one path component per `/`, as a shell does.
* A resolved model is handed on as a symlink whose basename is the model's name
  (`ORG--NAME[@REV][--SUB--FOLDER]`, the repository id spelled as the cache spells it), because
  `Model.name` is the basename of its path and a snapshot directory is a commit hash. The links live
  in `$XDG_CACHE_HOME/jsubspace/hf/<hash of the target>/` (default `~/.cache/jsubspace/hf`), one per
  (target, name): re-resolving writes nothing new, and a link never changes its target.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import posixpath
import re
import secrets
import urllib.parse
import warnings

from jsubspace.errors import CheckpointError
from jsubspace.io import _formats

PREFIX = "hf://"

_GLOB_CHARS = "*?["
_COMMIT = re.compile(r"[0-9a-f]{40}")

_PICKLE_REASON = "a pickle-based checkpoint (never loaded: it can run code); convert to safetensors"
_PICKLE_HINT = (
    "pickle-based checkpoints are never loaded (they can run code). Convert to safetensors "
    "first, in a trusted environment: load the state dict with torch (weights_only=True) and "
    "write it with safetensors.torch.save_file"
)


def is_hub_source(source: str) -> bool:
    """True for an `hf://` source."""
    return source.startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """A parsed `hf://` source.

    Attributes:
        source: the source as written.
        repo: `ORG/NAME`, perhaps holding glob characters.
        revision: the branch, tag or commit hash, or None for the default branch.
        subfolder: the `/`-separated path inside the repository ('' for its root), perhaps a glob.
    """

    source: str
    repo: str
    revision: str | None
    subfolder: str


@dataclasses.dataclass(frozen=True)
class HubModel:
    """One model a hub source resolved to.

    Attributes:
        source: the `hf://` id of this one model (concrete: no glob).
        name: the model's name, unique per (repository, revision as written, subfolder).
        target: the model in the snapshot (a directory, or a `*.safetensors` file).
        path: what is handed on: a link named `name` to `target` (`target` itself where no link
            could be written).
    """

    source: str
    name: str
    target: str
    path: str


def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def parse(source: str) -> HubSpec:
    """Parses `hf://ORG/NAME[@REVISION][/SUBFOLDER]` (a `/` in REVISION is written `%2F`)."""
    rest = source[len(PREFIX) :] if is_hub_source(source) else source
    usage = "expected hf://ORG/NAME[@REVISION][/SUBFOLDER]"
    parts = rest.split("/")
    if parts[0] in ("datasets", "spaces", "kernels"):
        raise CheckpointError(source, f"only model repositories are read ({usage})")
    if len(parts) < 2 or not parts[0] or not parts[1] or parts[1].startswith("@"):
        raise CheckpointError(source, usage)
    org, name = parts[0], parts[1]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = urllib.parse.unquote(revision)
        if not revision or _has_glob(revision) or revision.startswith("/") or ".." in revision:
            raise CheckpointError(source, f"bad revision {revision!r} ({usage})")
    if "@" in org:
        raise CheckpointError(source, usage)
    sub = [p for p in parts[2:] if p]
    if any(p in (".", "..") or "\\" in p for p in sub):
        raise CheckpointError(source, "the subfolder may not hold '.', '..' or '\\'")
    repo = f"{org}/{name}"
    if not _has_glob(repo):
        _validate_repo_id(source, repo)
    return HubSpec(source, repo, revision, "/".join(sub))


def _validate_repo_id(source: str, repo: str) -> None:
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise CheckpointError(source, f"bad repository id: {e}") from None


def _hf():
    try:
        import huggingface_hub
    except ImportError:  # a core dependency, but a broken environment should say so plainly
        raise CheckpointError(
            PREFIX, "hf:// sources need huggingface_hub: pip install 'huggingface_hub>=0.24'"
        ) from None
    return huggingface_hub


def _cache_dir() -> str:
    """The hub cache (`HF_HUB_CACHE`, `HF_HOME/hub`, ...), as huggingface_hub resolved it."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    """`HF_HUB_OFFLINE`, as huggingface_hub reads it."""
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline()) if is_offline is not None else bool(constants.HF_HUB_OFFLINE)


def _download_hint(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"download it first, where the Hub is reachable: hf download {repo}{rev} "
        "--include '*.safetensors' --include '*.json' (huggingface-cli download in older "
        "huggingface_hub), with the same HF_HOME / HF_HUB_CACHE"
    )


def _label(repo: str, revision: str | None, rel: str = "") -> str:
    rev = "@" + urllib.parse.quote(revision, safe="") if revision else ""
    return f"{PREFIX}{repo}{rev}" + (f"/{rel}" if rel else "")


def _model_name(repo: str, revision: str | None, rel: str) -> str:
    name = repo.replace("/", "--")  # '--' is never part of a repository id
    if revision:
        rev = revision[:12] if _COMMIT.fullmatch(revision) else revision
        name += "@" + rev.replace("/", "--")
    if rel:
        if rel.endswith(".safetensors"):
            rel = rel[: -len(".safetensors")]
        name += "--" + rel.replace("/", "--")
    return name


# ---- listings: the files of one snapshot, as '/'-separated paths relative to it


def _local_files(snapshot: str) -> set[str]:
    files = set()
    for here, _, names in os.walk(snapshot):
        rel = os.path.relpath(here, snapshot)
        for n in names:
            files.add(n if rel == "." else posixpath.join(*rel.split(os.sep), n))
    return files


def _listed_files(hf, repo: str, commit: str, cache: str) -> set[str] | None:
    """The repository's files at `commit` from the tree listing huggingface_hub caches beside the
    snapshot (complete, unlike the snapshot, which holds what was downloaded); None if absent."""
    get_tree = getattr(hf, "get_cached_repo_tree", None)
    if get_tree is None:
        return None
    try:
        return {f.path for f in get_tree(repo, revision=commit, cache_dir=cache)}
    except Exception:  # CachedRepoTreeNotFoundError, or an unreadable listing: use the snapshot
        return None


def _entries(files: set[str]) -> dict[str, list[str]]:
    """Every folder of the listing ('' the root) -> the files and folders directly in it."""
    entries: dict[str, list[str]] = {"": []}
    for f in files:
        child, parent = f, posixpath.dirname(f)
        while True:
            known = parent in entries
            entries.setdefault(parent, []).append(child)
            if known or not parent:
                break
            child, parent = parent, posixpath.dirname(parent)
    return entries


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _classify(rel: str, files: set[str], dirs: dict[str, list[str]]) -> str | None:
    """'model', 'pickled' or None, for a path of the listing; as `_formats.model_kind` and
    `_formats.pickled_model` decide for local paths."""
    if rel in files:
        base = posixpath.basename(rel)
        if rel.endswith(".safetensors"):
            return "model"
        if rel.endswith(_formats.PICKLE_SUFFIXES) and not base.startswith(_formats._NOT_MODELS):
            return "pickled"
        return None
    if rel not in dirs:
        return None
    if _join(rel, "adapter_config.json") in files:
        if _join(rel, "adapter_model.safetensors") not in files and any(
            _join(rel, "adapter_model" + s) in files for s in _formats.PICKLE_SUFFIXES
        ):
            return "pickled"
        return "model"
    if (
        _join(rel, "model.safetensors.index.json") in files
        or _join(rel, "model.safetensors") in files
    ):
        return "model"
    if any(f.endswith(".safetensors") and f in files for f in dirs[rel]):
        return None  # a folder of models, among them perhaps a pickled one
    pickles = [
        _join(rel, s + x) for s in ("pytorch_model", "model") for x in _formats.PICKLE_SUFFIXES
    ]
    if any(p in files for p in pickles) or _join(rel, "pytorch_model.bin.index.json") in files:
        return "pickled"
    return None


def _glob_match(rel: str, pattern: str) -> bool:
    """Shell glob semantics: `*` stays within one path component, and skips dot names."""
    got, want = rel.split("/"), pattern.split("/")
    return len(got) == len(want) and all(
        fnmatch.fnmatchcase(g, w) and (w.startswith(".") or not g.startswith("."))
        for g, w in zip(got, want)
    )


@dataclasses.dataclass
class _Selection:
    models: list[str]  # '' (the root), folders, or *.safetensors files
    pickled: list[str]


def _select(files: set[str], spec: HubSpec, repo: str, revision: str | None) -> _Selection:
    """The models `spec.subfolder` names in one snapshot's listing.

    A folder that is no model is a folder of models (its immediate children that are models),
    as a local directory is; a glob keeps only its matches that are models (or pickles).

    Raises:
        CheckpointError: the subfolder is absent or names no model.
    """
    dirs = _entries(files)
    sub = spec.subfolder
    label = _label(repo, revision, sub)
    if _has_glob(sub):
        targets = sorted(p for p in dirs.keys() | files if p and _glob_match(p, sub))
        expand = False
    elif sub in dirs or sub in files:
        targets, expand = [sub], True
    else:
        top = sorted(dirs[""])
        shown = ", ".join(top[:10]) + (f" and {len(top) - 10} more" if len(top) > 10 else "")
        raise CheckpointError(label, f"no file or folder {sub!r} in the repository ({shown})")
    selection = _Selection([], [])
    for target in targets:
        kind = _classify(target, files, dirs)
        if kind is None and expand and target in dirs:
            for child in sorted(dirs[target]):
                kind = _classify(child, files, dirs)
                if kind == "model":
                    selection.models.append(child)
                elif kind == "pickled":
                    selection.pickled.append(child)
        elif kind == "model":
            selection.models.append(target)
        elif kind == "pickled":
            selection.pickled.append(target)
    if not selection.models and not selection.pickled:
        where = f"subfolder glob {sub!r} matches" if _has_glob(sub) else "holds"
        raise CheckpointError(
            label,
            f"{where} no safetensors model (model.safetensors, a sharded "
            "model.safetensors.index.json, or a PEFT adapter folder)",
        )
    return selection


def _needed(snapshot: str, rel: str, files: set[str]) -> list[str]:
    """The files a selected model is read from (an index's shards read from the cached index)."""
    if rel in files:
        return [rel]
    if _join(rel, "adapter_config.json") in files:
        return [_join(rel, "adapter_config.json"), _join(rel, "adapter_model.safetensors")]
    index = _join(rel, "model.safetensors.index.json")
    if index not in files:
        return [_join(rel, "model.safetensors")]
    needed = [index]
    try:
        with open(os.path.join(snapshot, *index.split("/")), encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return needed  # not cached yet, or unreadable: load_model says what is wrong
    if isinstance(weight_map, dict):
        for shard in sorted({s for s in weight_map.values() if isinstance(s, str)}):
            path = posixpath.normpath(_join(rel, shard))
            if not path.startswith(("../", "/")) and path != "..":
                needed.append(path)  # one leaving the folder is refused by load_model
    return needed


def _missing(snapshot: str, selection: _Selection, files: set[str]) -> list[str]:
    return [
        f
        for rel in selection.models
        for f in _needed(snapshot, rel, files)
        if not os.path.isfile(os.path.join(snapshot, *f.split("/")))
    ]


# ---- the cache and the Hub


def _cached_snapshot(hf, repo: str, revision: str | None, cache: str) -> str | None:
    """The cached snapshot folder of `revision` (resolved through `refs/`), or None."""
    try:
        return hf.snapshot_download(
            repo, revision=revision, cache_dir=cache, allow_patterns=[], local_files_only=True
        )
    except (OSError, ValueError):  # LocalEntryNotFoundError (an OSError), or a bad revision
        return None


def _cached_revisions(hf, repo: str, cache: str) -> list[str] | None:
    """The refs and commits cached for `repo` (None when the repository is not cached)."""
    try:
        info = hf.scan_cache_dir(cache)
    except Exception:  # CacheNotFound, or an unreadable cache
        return None
    for cached in info.repos:
        if cached.repo_type == "model" and cached.repo_id == repo:
            refs = sorted({r for rev in cached.revisions for r in rev.refs})
            commits = sorted(rev.commit_hash[:12] for rev in cached.revisions if not rev.refs)
            return refs + commits
    return None


def _not_cached(hf, repo: str, revision: str | None, cache: str, source: str) -> CheckpointError:
    cached = _cached_revisions(hf, repo, cache)
    if cached is None:
        what = f"{repo} is not in the Hugging Face cache ({cache})"
    else:
        what = (
            f"revision {revision or 'main'!r} of {repo} is not in the Hugging Face cache "
            f"({cache}; cached: {', '.join(cached) or 'nothing'})"
        )
    return CheckpointError(
        source,
        f"{what}, and HF_HUB_OFFLINE is set: {_download_hint(repo, revision)}, or unset "
        "HF_HUB_OFFLINE to let jsubspace download the files it reads",
    )


def _hub_error(e: Exception, repo: str, revision: str | None, source: str) -> CheckpointError:
    from huggingface_hub import utils

    if isinstance(e, utils.RevisionNotFoundError):
        return CheckpointError(source, f"revision {revision!r} does not exist in {repo}")
    if isinstance(e, utils.RepositoryNotFoundError):
        return CheckpointError(
            source,
            f"no model repository {repo} on the Hub, or it is private or gated (log in with "
            "`hf auth login`, or set HF_TOKEN)",
        )
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(
        source,
        f"cannot download {repo} from the Hub ({type(e).__name__}: {first}); "
        f"{_download_hint(repo, revision)}, or set HF_HUB_OFFLINE=1 to read the cache only",
    )


def _exact(files: list[str]) -> list[str]:
    return [glob.escape(f) for f in files]  # allow_patterns are fnmatch patterns


def _from_hub(hf, spec: HubSpec, repo: str, cache: str) -> tuple[str | None, _Selection, set[str]]:
    """Downloads what the source names, chosen from the Hub's listing of the revision: the
    models' indexes first (they name the shards), then every file the models are read from.
    The snapshot is None when the selection holds pickles only (nothing is downloaded)."""
    api = hf.HfApi()
    for _ in range(2):
        try:
            commit = api.repo_info(repo, revision=spec.revision).sha
            files = set(api.list_repo_files(repo, revision=commit))
            selection = _select(files, spec, repo, spec.revision)
            if not selection.models:
                return None, selection, files
            snapshot = ""
            indexes = [
                index
                for rel in selection.models
                if (index := _join(rel, "model.safetensors.index.json")) in files
            ]
            if indexes:
                snapshot = hf.snapshot_download(
                    repo, revision=commit, cache_dir=cache, allow_patterns=_exact(indexes)
                )
            needed = {f for rel in selection.models for f in _needed(snapshot, rel, files)}
            # By the revision as given, so that huggingface_hub records its ref for offline use.
            snapshot = hf.snapshot_download(
                repo,
                revision=spec.revision,
                cache_dir=cache,
                allow_patterns=_exact(sorted(needed & files)),
            )
        except CheckpointError:
            raise
        except Exception as e:  # huggingface_hub's HTTP and cache errors
            raise _hub_error(e, repo, spec.revision, spec.source) from None
        if os.path.basename(os.path.normpath(snapshot)) == commit:
            return snapshot, selection, files
        # The branch moved between the listing and the download: list it again.
    raise CheckpointError(
        spec.source,
        f"revision {spec.revision or 'main'!r} of {repo} moved twice during the download; "
        "try again, or name a commit hash",
    )


def _resolve_repo(
    hf, spec: HubSpec, repo: str, cache: str, unreadable: list[tuple[str, str]] | None
) -> list[HubModel]:
    offline = _offline()
    snapshot = _cached_snapshot(hf, repo, spec.revision, cache)
    selection = None
    if snapshot is not None:
        commit = os.path.basename(os.path.normpath(snapshot))
        files = _listed_files(hf, repo, commit, cache) or _local_files(snapshot)
        try:
            selection = _select(files, spec, repo, spec.revision)
            missing = _missing(snapshot, selection, files)
            if missing and offline:
                shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
                raise CheckpointError(
                    _label(repo, spec.revision, spec.subfolder),
                    f"the cached snapshot lacks {shown}, and HF_HUB_OFFLINE is set: "
                    f"{_download_hint(repo, spec.revision)}",
                )
            if not offline and (missing or (selection.pickled and not selection.models)):
                selection = None  # perhaps the Hub has what the cache lacks
        except CheckpointError:
            if offline:
                raise
            selection = None
    if selection is None:
        if offline:
            raise _not_cached(hf, repo, spec.revision, cache, spec.source)
        snapshot, selection, files = _from_hub(hf, spec, repo, cache)

    if selection.pickled:
        labels = [_label(repo, spec.revision, rel) for rel in selection.pickled]
        if unreadable is not None and selection.models:
            unreadable.extend((label, _PICKLE_REASON) for label in labels)
        elif len(labels) == 1 and not selection.models:
            raise CheckpointError(labels[0], f"only pickled weights here; {_PICKLE_HINT}")
        else:
            names = ", ".join(selection.pickled[:3])
            more = f" and {len(labels) - 3} more" if len(labels) > 3 else ""
            raise CheckpointError(
                spec.source,
                f"{len(labels)} model(s) here are pickles ({names}{more}), which are never "
                "loaded (they can run code): convert them to safetensors (torch.load with "
                "weights_only=True, then safetensors.torch.save_file), or pass "
                "--skip_unreadable to analyse the others",
            )
    models = []
    for rel in selection.models:
        target = os.path.join(snapshot, *rel.split("/")) if rel else snapshot
        name = _model_name(repo, spec.revision, rel)
        is_file = rel in files
        models.append(
            HubModel(_label(repo, spec.revision, rel), name, target, _link(target, name, is_file))
        )
    return models


def _match_repos(hf, spec: HubSpec, cache: str) -> list[str]:
    try:
        info = hf.scan_cache_dir(cache)
        cached = [r.repo_id for r in info.repos if r.repo_type == "model"]
    except Exception:  # CacheNotFound: no cache yet
        cached = []
    repos = sorted(r for r in cached if _glob_match(r, spec.repo))
    if not repos:
        raise CheckpointError(
            spec.source,
            f"matches no model repository in the Hugging Face cache ({cache}); a glob over "
            "repositories matches cached ones only: download them first (hf download ORG/NAME "
            "--include '*.safetensors' --include '*.json')",
        )
    return repos


def resolve(source: str, *, unreadable: list[tuple[str, str]] | None = None) -> list[HubModel]:
    """The models an `hf://` source names, cached or downloaded as needed.

    Args:
        source: `hf://ORG/NAME[@REVISION][/SUBFOLDER]`, with globs allowed in NAME (cached
            repositories) and in SUBFOLDER (folders and `*.safetensors` files of the snapshot).
        unreadable: as in `resolve_sources`: pickled models met beside others are listed there
            instead of raising.

    Raises:
        CheckpointError: naming the source: not cached while offline (with the command that
            downloads it), no such repository, revision or subfolder, no safetensors model, or
            only pickles (with the conversion hint).
    """
    hf = _hf()
    spec = parse(source)
    cache = _cache_dir()
    repos = _match_repos(hf, spec, cache) if _has_glob(spec.repo) else [spec.repo]
    models = []
    for repo in repos:
        models.extend(_resolve_repo(hf, spec, repo, cache, unreadable))
    return models


# ---- named links


def links_root() -> str:
    """Where the named links to snapshots live (`$XDG_CACHE_HOME/jsubspace/hf`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jsubspace", "hf")


def _link(target: str, name: str, is_file: bool) -> str:
    """A symlink named `name` (`name.safetensors` for a file) to `target`; `target` itself, with
    a warning, where none can be written (the model is then named by the target's basename)."""
    target = os.path.abspath(target)
    basename = name + (".safetensors" if is_file else "")
    folder = os.path.join(links_root(), hashlib.sha256(target.encode()).hexdigest()[:16])
    link = os.path.join(folder, basename)
    try:
        if os.path.islink(link) and os.readlink(link) == target:
            return link
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{basename}.{os.getpid()}.{secrets.token_hex(4)}")
        os.symlink(target, tmp, target_is_directory=not is_file)
        os.replace(tmp, link)  # atomic; a concurrent writer writes the same link
    except OSError as e:
        warnings.warn(
            f"cannot write the link naming {name} in {folder} ({e.strerror or e}); the model is "
            f"read from {target} and named {os.path.basename(target)}",
            stacklevel=3,
        )
        return target
    return link


def dedup_key(path: str) -> str:
    """The key under which `resolve_sources` drops repeats: a named link counts as its target,
    so `hf://a/x` and `hf://a/x@main` (one snapshot, two names) are one model."""
    if os.path.islink(path) and os.path.dirname(os.path.dirname(path)) == links_root():
        return os.readlink(path)
    return path
