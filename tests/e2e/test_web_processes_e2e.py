"""Two web processes on one data directory and database share the login limit.

One ``serve --roles gateway,worker,web`` and one ``serve --roles web`` on its own HTTP port (what
sits behind a load balancer): failed logins for one user name from one address, spread over both
processes, lock that name out on both once the configured limit is reached. With a per-process
limiter each process would allow the limit on its own (twice the attempts in all).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from e2e_helpers import Server, create_users

MAX_FAILURES = 3
PASSWORD = "correct horse battery staple"


def _attempt(server: Server, username: str, password: str) -> int:
    """One login through the real form (fresh login-CSRF cookie and token); the HTTP status."""
    with httpx.Client(base_url=server.url(""), trust_env=False, timeout=30) as client:
        page = client.get("/login")
        token = re.search(r'name="login_csrf" value="([^"]*)"', page.text)
        assert page.status_code == 200 and token, page.text[:500]
        data = {"username": username, "password": password, "login_csrf": token.group(1)}
        return client.post("/login", data=data).status_code


def test_failed_logins_over_two_web_processes_lock_the_user_out_on_both(launch_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {"XRAY_TRIAGE_LOGIN_MAX_FAILURES": str(MAX_FAILURES)}
    front = launch_server.launch("front", env={**env, "XRAY_TRIAGE_ROLES": "gateway,worker,web"})
    web = Server(root=tmp_path / "web2", model_dir=None, env_extra=env, roles="web")
    web.root.mkdir()
    web.data_dir = front.data_dir  # the same data directory and database
    launch_server.servers.append(web)
    web.start()
    assert web.http_port != front.http_port
    create_users(front.data_dir, [("bs.lan", "specialist", None, PASSWORD)])

    processes = [front, web]
    for n in range(MAX_FAILURES):  # alternately: neither process alone sees the limit
        status = _attempt(processes[n % 2], "bs.lan", "wrong password")
        assert status == 401, f"failure {n + 1}: {status}\n{processes[n % 2].log_tail()}"
    for server in processes:  # locked on both, even with the right password
        assert _attempt(server, "bs.lan", PASSWORD) == 429, server.log_tail()
    # Another user from the same address is not locked (the per-network limit is 4 x 3).
    create_users(front.data_dir, [("bs.hoa", "specialist", None, PASSWORD)])
    assert _attempt(web, "bs.hoa", PASSWORD) == 303
