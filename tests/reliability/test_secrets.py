"""The API key (OPENAI_API_KEY or RLCD_API_KEY, never a flag) reaches the server and nothing else: not
stdout, stderr, error lines, manifests or records, even when a careless server repeats it in its replies."""

from __future__ import annotations

from pathlib import Path

import pytest
from rel_helpers import FaultServer, assert_user_error, env, question_file, rlcd_cmd, run

KEY = "sk-rlcd-test-0123456789abcdefSECRET"


@pytest.mark.parametrize("variable", ["OPENAI_API_KEY", "RLCD_API_KEY"])
def test_api_key_appears_nowhere_but_in_the_request(tmp_path, variable):
    server = FaultServer(tmp_path)
    try:
        prompts = question_file(tmp_path / "q.json", 8)

        def simulate(out, *extra):
            return run(rlcd_cmd("simulate", "--backend", "openai", "--base-url", server.url, "--api-model", "fake", "--prompts-file",
                                prompts, "--out-dir", tmp_path / out, "--batch-size", 2, "--max-retries", 1, "--method", "rlaif", *extra),
                       env=env(**{variable: KEY}))

        # retried faults whose replies repeat the key, then success
        server.control(leak_auth=True, script=["503", "malformed", "429", "wrong_shape"], retry_after=0)
        done = simulate("ok")
        assert done.returncode == 0, done.stderr
        sent = {e["auth"] for e in server.log()}
        # a fault that lasts: the server's message, key included, goes into the error line, redacted
        server.control(leak_auth=True, fail_after=0, fail_kind="503")
        failed = simulate("failed")
        assert "***" in assert_user_error(failed, "HTTP 503", only_line=False)
        # a refusal that is not retried (401), with the key in the server's message
        server.control(leak_auth=True, fail_after=0, fail_kind="auth")
        refused = simulate("refused")
        assert "***" in assert_user_error(refused, "HTTP 401", "invalid key", only_line=False)
        sent |= {e["auth"] for e in server.log()}
    finally:
        server.close()
    assert sent == {f"Bearer {KEY}"}  # the key did reach the server
    for proc in (done, failed, refused):
        assert KEY not in proc.stdout + proc.stderr
    written = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.name.startswith("manifest") for p in written) and any(p.name.startswith("records") for p in written)
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
