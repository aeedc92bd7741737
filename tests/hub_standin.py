"""A local stand-in of the hub API for tests (no network): an http.server in a thread that implements the
endpoints ``HfApi.create_repo`` and ``HfApi.upload_folder`` call (validate-yaml, preupload, commit), answering
"regular" (inline) upload for every file so no LFS or Xet storage is involved, and records what arrives: the
repos created, the files of each commit by repo, and the Authorization headers."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "tester"


class HubStandIn:
    def __init__(self):
        self.repos: list[str] = []
        self.commits: list[dict] = []  # {"repo": id, "message": str, "files": {path: bytes}}
        self.auth: list[str] = []
        self.requests: list[str] = []
        self.validated: list[str] = []  # the README.md contents sent to /api/validate-yaml
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                standin.auth.append(self.headers.get("Authorization", ""))
                path = self.path.split("?")[0]
                standin.requests.append(f"POST {path}")
                if path == "/api/validate-yaml":  # upload_folder checks a README.md's metadata first
                    import yaml

                    content = json.loads(raw)["content"]
                    standin.validated.append(content)
                    try:
                        if content.startswith("---"):
                            yaml.safe_load(content.split("---")[1])
                    except Exception as exc:
                        return self._reply(400, {"errors": [{"message": str(exc)}]})
                    return self._reply(200, {})
                if path == "/api/repos/create":
                    body = json.loads(raw)
                    repo = f"{body.get('organization') or USER}/{body['name']}"
                    if repo not in standin.repos:
                        standin.repos.append(repo)
                    return self._reply(200, {"url": f"{standin.endpoint}/{repo}", "name": repo})
                parts = path.split("/")  # /api/models/{ns}/{name}/{preupload|commit}/{revision}
                if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                    repo, action = f"{parts[3]}/{parts[4]}", parts[5]
                    if repo not in standin.repos:
                        return self._reply(404, {"error": f"Repository {repo} not found"})
                    if action == "preupload":
                        files = json.loads(raw)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
                        files, message = {}, ""
                        for item in lines:
                            if item["key"] == "header":
                                message = item["value"].get("summary", "")
                            elif item["key"] == "file":
                                value = item["value"]
                                files[value["path"]] = base64.b64decode(value["content"])
                            else:
                                return self._reply(400, {"error": f"stand-in: unexpected {item['key']}"})
                        standin.commits.append({"repo": repo, "message": message, "files": files})
                        return self._reply(200, {"commitUrl": f"{standin.endpoint}/{repo}/commit/{'0' * 40}",
                                                 "commitOid": "0" * 40, "success": True})
                return self._reply(404, {"error": f"stand-in: no endpoint {path}"})

            def do_GET(self):
                standin.requests.append(f"GET {self.path}")
                standin.auth.append(self.headers.get("Authorization", ""))
                return self._reply(404, {"error": f"stand-in: no endpoint {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> dict[str, bytes]:
        """Every file committed to `repo`, the later commit winning."""
        out: dict[str, bytes] = {}
        for commit in self.commits:
            if commit["repo"] == repo:
                out.update(commit["files"])
        return out
