"""A hub-shaped HTTP server on 127.0.0.1 for the fetch tests: huggingface_hub talks to it as to the hub.

It answers what huggingface_hub requests to download one file, `HEAD` and `GET
/{owner}/{name}/resolve/{revision}/{filename}`, with the headers it reads: `X-Repo-Commit` (the commit),
`ETag` (the file's git blob id), `Content-Length`; and its errors as the hub sends them: status and
`X-Error-Code` (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`, `EntryNotFound`), which
huggingface_hub turns into its error classes (utils/_http.py `hf_raise_for_status`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def commit_of(text: str) -> str:
    """A 40-hex commit id, as the hub's are."""
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class Repo:
    revisions: dict[str, tuple[str, dict[str, bytes]]]  # branch or tag -> (commit, files)
    gated_token: str | None = None  # gated: only this token gets the files


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization

    def add(self, repo: str, config: dict | None, *, revision: str = "main", gated_token: str | None = None) -> str:
        """Serve `config` as `repo`'s config.json at `revision` (None: a repo without one); its commit."""
        commit = commit_of(f"{repo}@{revision}")
        files = {} if config is None else {"config.json": json.dumps(config).encode()}
        entry = self.repos.setdefault(repo, Repo({}, gated_token))
        entry.revisions[revision] = (commit, files)
        return commit

    def answer(self, method: str, path: str, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        self.requests.append((method, path, auth))
        parts = path.split("?")[0].split("/")
        if len(parts) < 6 or parts[3] != "resolve":
            return 404, {}, b"Not Found"
        repo_id, revision, filename = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
        repo = self.repos.get(repo_id)
        if repo is None:  # the hub answers 401 to an anonymous request, 404 to a logged-in one
            return (404 if auth else 401), {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if repo.gated_token and auth != f"Bearer {repo.gated_token}":
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return (403 if auth else 401), {"X-Error-Code": "GatedRepo", "X-Error-Message": message}, b""
        by_commit = {c: (c, files) for c, files in repo.revisions.values()}
        if revision not in repo.revisions and revision not in by_commit:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {revision}"}, b""
        commit, files = repo.revisions.get(revision) or by_commit[revision]
        if filename not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                         "X-Repo-Commit": commit}, b""
        body = files[filename]
        blob = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()  # git's blob id, the hub's ETag
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{blob}"', "Content-Type": "application/json"}, body


class Server:
    """`Hub` served over HTTP in a thread at `url` (by default HF_ENDPOINT's port, which the tests' conftest
    sets to a free one before huggingface_hub is imported: it reads HF_ENDPOINT once)."""

    def __init__(self, hub: Hub, port: int | None = None):
        hub_ = hub

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, with_body: bool):
                status, headers, body = hub_.answer(self.command, self.path, self.headers.get("Authorization"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_HEAD(self):
                self._reply(False)

            def do_GET(self):
                self._reply(True)

            def log_message(self, *args):
                pass

        if port is None:
            port = urlsplit(os.environ["HF_ENDPOINT"]).port
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # allow_reuse_address: rebinding is fine
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Shut the server and free its port: a request now meets a refused connection."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
