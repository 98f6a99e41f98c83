"""Model configs from the Hugging Face hub: the local Hugging Face cache first, else a download.

A hub id (`owner/name`, optionally `@revision`) that is neither in the catalog nor a local path is
read from the local Hugging Face cache; when it is not there, its config.json alone is downloaded
with huggingface_hub into that cache, so the next run finds it offline. huggingface_hub is imported
only on that download path: `fit` on a catalog model or a local config never loads it.

Every failure is one line: a gated or private model says how to log in, a missing one says so (with
close catalog names), and no network says how to point memplan at a local config instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from memplan import arch as archs
from memplan import configs
from memplan.errors import MemplanError, did_you_mean, one_line

DEFAULT_ENDPOINT = "https://huggingface.co"
# owner/name as the hub spells repo ids (huggingface_hub's validate_repo_id: letters, digits, - _ .).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
COMMIT = re.compile(r"[0-9a-f]{40}")
SHORT_COMMIT = 7  # as the hub's pages and git show a commit

# Multimodal model_types whose causal LM in transformers is the text model alone: for these,
# AutoModelForCausalLM builds its model from `config.text_config` (the mapped class's config_class is
# the text sub-config), so taking text_config is exactly what a causal-LM fine-tune trains. Other
# configs holding a text_config (gemma3, llava, mistral3, qwen2_5_vl...) train their text model too
# when fine-tuned as text LMs, but transformers' own causal-LM class for them keeps the vision tower:
# memplan plans the text model and says the tower is not counted. (transformers 5.24,
# models/auto/modeling_auto.py MODEL_FOR_CAUSAL_LM_MAPPING_NAMES; a test checks this against it.)
CAUSAL_LM_IS_TEXT_MODEL = frozenset({"dots3_note", "emu3", "llama4", "mllama", "qwen3_5", "qwen3_5_moe", "qwen4_exp"})


class HubError(MemplanError):
    """The hub could not give a config (offline, gated, missing): no other source will either."""


@dataclass(frozen=True)
class Found:
    """A hub model's config as memplan plans it, and where it came from."""

    config: dict  # the fields of the model that trains (a multimodal config's text model)
    name: str  # hub id @ commit, as estimates name the model
    source: str  # the config.json read (in the cache), and the page it came from
    where: str  # how error messages name the config


# ---- names -------------------------------------------------------------------------------------


def parse(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `owner/name[@revision]`, or None when `model` is not shaped so."""
    repo, at, revision = model.strip().partition("@")
    if not HUB_ID.fullmatch(repo) or ".." in repo or "--" in repo:
        return None
    if at and not _valid_revision(revision):
        raise MemplanError(f"{configs._text(model)}: {configs._text(revision)!r} is not a revision; give a branch, "
                           "tag or commit after the '@' (owner/name@main)")
    return repo, revision or None


def _valid_revision(revision: str) -> bool:
    """A git ref name or commit (no spaces, no '..', no leading '/'): nothing that walks out of the cache."""
    return (bool(revision) and not revision.startswith("/") and ".." not in revision and "\\" not in revision
            and all(c.isprintable() and not c.isspace() for c in revision))


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT, read when called (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads them."""
    return any((os.environ.get(k) or "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# ---- the local cache ---------------------------------------------------------------------------


def cache_dirs() -> list[Path]:
    """Where a Hugging Face hub cache may be, in huggingface_hub's order; downloads go to the first."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser())
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    dirs.append(Path(xdg).expanduser() / "huggingface" / "hub")
    return dirs


def cached(repo: str, revision: str | None = None) -> Path | None:
    """The cached config.json of `repo` at `revision` (a branch, tag or commit), or None.

    Without a revision: the snapshot `refs/main` points at, else the newest snapshot holding one.
    """
    folder = "models--" + repo.replace("/", "--")
    for root in cache_dirs():
        base = root / folder
        if not (base / "snapshots").is_dir():
            continue
        commit = revision if revision and COMMIT.fullmatch(revision) else _ref(base, revision or "main")
        if commit is not None and (base / "snapshots" / commit / "config.json").is_file():
            return base / "snapshots" / commit / "config.json"
        if revision and re.fullmatch(r"[0-9a-f]{7,39}", revision):  # a short commit, as estimates name it
            found = list((base / "snapshots").glob(f"{revision}*/config.json"))
            if len(found) == 1:
                return found[0]
        if revision is None:
            found = sorted((base / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                return found[0]
    return None


def _ref(base: Path, revision: str) -> str | None:
    """The commit a cached branch or tag points at (huggingface_hub writes refs/<revision>)."""
    try:
        commit = (base / "refs" / revision).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if re.fullmatch(r"[0-9a-zA-Z]+", commit) else None


# ---- the hub -----------------------------------------------------------------------------------


def fetch(repo: str, revision: str | None, *, known: Iterable[str] = ()) -> Path:
    """Download `repo`'s config.json at `revision` into the local cache; its path there.

    `known` are the catalog's names, for the "did you mean" of a failure.
    """
    if offline():
        raise _unreachable(repo, "HF_HUB_OFFLINE is set", known)
    try:
        import huggingface_hub as hf
    except ImportError:
        raise HubError(f"{repo}: fetching a config from the hub needs huggingface_hub (pip install huggingface_hub); "
                       "or give a local config (`memplan fit path/to/config.json`)") from None
    rev, url_base = revision or "main", endpoint()
    try:
        # A metadata request first: it fails at once without network, where hf_hub_download, finding
        # nothing cached, retries a refused connection with backoff for about 25 s before giving up.
        # Its token is HF_TOKEN or the saved login (`hf auth login`), as huggingface_hub reads them.
        meta = hf.get_hf_file_metadata(hf.hf_hub_url(repo, "config.json", revision=rev, endpoint=url_base))
    except Exception as e:  # huggingface_hub's HTTP errors, and its HTTP client's
        raise _explain(e, repo, rev, known) from None
    if not meta.commit_hash or not meta.etag:
        raise HubError(f"{url_base} does not answer as a Hugging Face hub (no commit or ETag header on "
                       f"{repo}'s config.json); check HF_ENDPOINT")
    try:
        with _quiet():
            path = hf.hf_hub_download(repo, "config.json", revision=rev, cache_dir=str(cache_dirs()[0]),
                                      endpoint=url_base)
    except Exception as e:  # as above, and a cache that cannot be written
        raise _explain(e, repo, rev, known) from None
    return Path(path)


class _quiet:
    """No progress bar on stderr for one small file (restores the caller's setting)."""

    def __enter__(self):
        from huggingface_hub import utils

        self.utils, self.was_disabled = utils, utils.are_progress_bars_disabled()
        utils.disable_progress_bars()

    def __exit__(self, *exc):
        if not self.was_disabled:
            self.utils.enable_progress_bars()


def _explain(e: Exception, repo: str, rev: str, known: Iterable[str]) -> HubError:
    """The one line that says why the hub gave no config, and what to do."""
    from huggingface_hub import errors as hf_errors

    site = f"{endpoint()}/{repo}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf_errors.GatedRepoError):
        return HubError(f"{repo} is a gated model: accept its license on {site}, then {login}")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        private = f"; if it is private, {login}" if status == 401 else ""
        return HubError(f"{repo} does not exist on the hub ({endpoint()}){did_you_mean(repo, known)}{private}")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return HubError(f"{repo} has no revision {rev!r} on the hub; give a branch, tag or commit of {site}")
    if isinstance(e, hf_errors.EntryNotFoundError) and status is not None:
        return HubError(f"{repo}@{rev} holds no config.json: memplan reads a transformers model's config")
    if isinstance(e, hf_errors.HfHubHTTPError) and status is not None:
        if status == 401:
            return HubError(f"the hub refused the token (HF_TOKEN or the saved login) for {repo}; {login} again")
        response = e.response  # httpx's (reason_phrase) in huggingface_hub 1.x on, requests' (reason) before
        message = (response.headers.get("X-Error-Message") or getattr(response, "reason_phrase", None)
                   or getattr(response, "reason", "") or "")
        return HubError(f"{repo}: the hub at {endpoint()} answered HTTP {status} ({configs._text(message, 120)})")
    if isinstance(e, hf_errors.HFValidationError):
        return HubError(f"{repo!r} is not a hub id: {one_line(e, limit=160)}")
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return HubError(f"cannot write the Hugging Face cache ({configs._text(str(e.filename), 120)}: "
                        f"{e.strerror or e}); set HF_HUB_CACHE to a folder you can write")
    # What is left is the network: refused, unresolvable, timed out, dropped, or offline mode.
    return _unreachable(repo, one_line(e, limit=160, with_type=True), known)


def _unreachable(repo: str, why: str, known: Iterable[str]) -> HubError:
    return HubError(f"{repo} is not in the catalog{did_you_mean(repo, known)} nor in the local Hugging Face cache, "
                    f"and memplan could not reach the hub at {endpoint()} ({why}); give a local config "
                    f"(`memplan fit path/to/config.json`) or download it once (`hf download {repo} config.json`)")


# ---- what trains -------------------------------------------------------------------------------


def text_model(cfg: dict, where: str) -> tuple[dict, str, str]:
    """(config, note, where) of the language model a causal-LM fine-tune trains: `cfg` itself, or the
    `text_config` of a multimodal config (gemma3, mllama, llava...), with a note for its name and
    `where` naming that part for error messages. A config of a registered model_type stays as it is.
    """
    text, mt = cfg.get("text_config"), cfg.get("model_type")
    if not isinstance(text, dict) or archs.find(mt) is not None:
        return cfg, "", where
    if not isinstance(text.get("model_type"), str) or not text["model_type"]:
        raise MemplanError(f"{configs._text(where, 200)}: a {configs._text(str(mt))!r} config whose text_config has "
                           "no model_type; memplan plans text models: give the config of its language model")
    where = f"{where} text_config"
    if mt in CAUSAL_LM_IS_TEXT_MODEL:
        return dict(text), f" (text model, {text['model_type']})", where
    return dict(text), f" (text model, {text['model_type']}; the {mt} vision tower is not counted)", where


def find(model: str, *, known: Iterable[str] = ()) -> Found | None:
    """A hub id's config from the local cache, else from the hub; None when `model` is no hub id."""
    parsed = parse(model)
    if parsed is None:
        return None
    repo, revision = parsed
    path = cached(repo, revision)
    url = ""
    if path is None:
        path = fetch(repo, revision, known=known)
        url = f" from {endpoint()}/{repo}"
    commit = path.parent.name
    cfg, note, where = text_model(configs.read_config(path), f"{repo} ({'hub' if url else 'local cache'})")
    return Found(cfg, f"{repo}@{commit[:SHORT_COMMIT]}{note}", f"{path}{url}", where)
