"""Drives `capsule-mcp` with the official MCP Python SDK (run by tests/mcp_client.rs and
tests/mcp_real.rs).

    python3 client.py <path to capsule-mcp> [mock|killed|real]

CAPSULE_API and CAPSULE_TOKEN come from the environment. Talks to the Rust test on stdout/stdin:
- mock (default): the whole tool set on the mock backend; prints STOP and waits for STOPPED (the
  HTTP server is down), prints START and waits for STARTED.
- killed: prints SLOW right before a slow exec (`sleep 5`), during which the test kills the server
  process (kill -9); the call must fail saying the API is unreachable; prints DOWN and waits for
  STARTED (the server was started again on the same port and state), then the next calls work.
- real: the must-hold flow once against a real capsule (create, exec, a binary file, terminate,
  usage).
- http: over streamable HTTP (`capsule-mcp --http`) at CAPSULE_MCP_URL instead of stdio: the tools
  are listed, a capsule is created, runs `echo hi` and is terminated.
Prints OK at the end. Any failed check raises, and the script exits non-zero.
"""

import asyncio
import base64
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client

try:
    import jsonschema
except ImportError:  # required keys only
    jsonschema = None

STREAM_CAP = 16 * 1024
EXPECTED_TOOLS = {
    "create", "list", "status", "exec", "write_file", "read_file", "list_files",
    "usage", "sleep", "wake", "terminate", "exec_background", "read_output", "expose_port",
}


def say(line):
    print(line, flush=True)


def wait_for(word):
    got = sys.stdin.readline().strip()
    assert got == word, f"expected {word!r} from the test, got {got!r}"


class Checked:
    def __init__(self, session, schemas):
        self.session = session
        self.schemas = schemas

    async def call(self, name, args):
        schema = self.schemas[name]
        if jsonschema is not None:
            jsonschema.validate(args, schema)
        else:
            for k in schema.get("required", []):
                assert k in args, f"{name}: missing required {k}"
        r = await self.session.call_tool(name, args)
        assert r.content and r.content[0].type == "text", r
        return r, r.content[0].text

    async def ok(self, name, args):
        r, text = await self.call(name, args)
        assert not r.isError, f"{name} {args} failed: {text}"
        return json.loads(text)

    async def err(self, name, args):
        r, text = await self.call(name, args)
        assert r.isError, f"{name} {args} should have failed: {text}"
        return text


async def session_for(binary, body):
    params = StdioServerParameters(command=binary, args=[], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            await body(session, tools)


async def read_all(c, name, handle):
    """The whole output of a background process, reading from next_offset each time."""
    offset, out, last = 0, "", None
    for _ in range(30):
        last = await c.ok("read_output", {"name": name, "handle": handle, "offset": offset, "wait_secs": 2})
        assert last["next_offset"] >= offset, last
        out += last["stdout"]
        offset = last["next_offset"]
        if not last["running"]:
            break
    return out, offset, last


async def mock_flow(session, tools):
    names = {t.name for t in tools}
    assert names == EXPECTED_TOOLS, names
    for t in tools:
        assert t.description and len(t.description) > 10, t
        assert t.inputSchema.get("type") == "object", t.inputSchema
        if jsonschema is not None:
            jsonschema.Draft202012Validator.check_schema(t.inputSchema)
    schemas = {t.name: t.inputSchema for t in tools}
    assert "name" in schemas["create"]["required"], schemas["create"]
    assert {"name", "path", "content"} <= set(schemas["write_file"]["required"])
    c = Checked(session, schemas)

    # Create, exec, files.
    rec = await c.ok("create", {"name": "agent-mcp-1", "size": "1x1gb", "credit_limit": "2.00"})
    assert rec["name"] == "agent-mcp-1", rec
    out = await c.ok("exec", {"name": "agent-mcp-1", "argv": ["echo", "hi"]})
    assert out["exit_code"] == 0 and "hi" in out["stdout"], out
    out = await c.ok("exec", {"name": "agent-mcp-1", "shell": "echo hi; exit 3"})
    assert out["exit_code"] == 3 and "hi" in out["stdout"], out

    data = b"bin\x00\xff\xfe\x80end"
    w = await c.ok("write_file", {
        "name": "agent-mcp-1", "path": "/workspace/blob.bin",
        "content": base64.b64encode(data).decode(), "encoding": "base64",
    })
    assert w["bytes"] == len(data), w
    r = await c.ok("read_file", {"name": "agent-mcp-1", "path": "/workspace/blob.bin", "encoding": "base64"})
    assert base64.b64decode(r["content"]) == data, r
    text = await c.err("read_file", {"name": "agent-mcp-1", "path": "/workspace/blob.bin"})
    assert "base64" in text, text
    await c.ok("write_file", {"name": "agent-mcp-1", "path": "/workspace/a.txt", "content": "héllo\n"})
    r = await c.ok("read_file", {"name": "agent-mcp-1", "path": "/workspace/a.txt"})
    assert r["content"] == "héllo\n", r
    ls = await c.ok("list_files", {"name": "agent-mcp-1", "path": "/workspace"})
    assert {"a.txt", "blob.bin"} <= {e["name"] for e in ls["entries"]}, ls

    # 5 MB of output: head and tail kept, the middle dropped and counted.
    r, text = await c.call("exec", {"name": "agent-mcp-1", "argv": ["big-output"]})
    assert not r.isError, text[:500]
    assert len(text) < 2 * STREAM_CAP + 2048, len(text)
    out = json.loads(text)
    assert out["stdout"].startswith("HEAD-MARK"), out["stdout"][:50]
    assert out["stdout"].endswith("TAIL-MARK"), out["stdout"][-50:]
    assert out["stdout_bytes"] == 5_000_018, out["stdout_bytes"]
    assert out["stdout_dropped_bytes"] == 5_000_018 - STREAM_CAP, out["stdout_dropped_bytes"]
    assert f"{out['stdout_dropped_bytes']} bytes dropped" in out["stdout"]

    listed = await c.ok("list", {})
    assert "agent-mcp-1" in [x["name"] for x in listed["capsules"]], listed
    st = await c.ok("status", {"name": "agent-mcp-1"})
    assert st["state"] == "running", st
    await c.ok("sleep", {"name": "agent-mcp-1"})
    await c.ok("wake", {"name": "agent-mcp-1"})

    # Background exec: a handle now, the output later (from an offset), then its exit.
    bg = await c.ok("exec_background", {"name": "agent-mcp-1", "shell": "echo started; sleep 1; echo done"})
    assert bg["handle"], bg
    out, end, last = await read_all(c, "agent-mcp-1", bg["handle"])
    assert "started" in out and "done" in out, out
    assert not last["running"] and last["exit_code"] == 0, last
    again = await c.ok("read_output", {"name": "agent-mcp-1", "handle": bg["handle"], "offset": end})
    assert again["stdout"] == "" and again["exit_code"] == 0, again
    text = await c.err("read_output", {"name": "agent-mcp-1", "handle": "no-such-handle"})
    assert "error" in text, text

    # Expose a port: the one URL.
    u = await c.ok("expose_port", {"name": "agent-mcp-1", "port": 8080})
    assert u["port"] == 8080 and u["url"].startswith("http"), u
    assert u["host_label"] and u["host_label"] in u["url"], u
    text = await c.err("expose_port", {"name": "agent-mcp-1", "port": 0})
    assert "65535" in text, text

    # Terminate; usage shows compute charged.
    t = await c.ok("terminate", {"name": "agent-mcp-1"})
    assert t["state"] == "terminated", t
    u = await c.ok("usage", {"name": "agent-mcp-1"})
    assert u["usage"]["compute_minutes"] >= 1, u
    assert u["limits"], u

    # Policy errors are tool results with isError and the API's message.
    text = await c.err("create", {"name": "other-1"})
    assert "prefix" in text and "agent-" in text, text
    text = await c.err("create", {"name": "agent-big", "size": "64x1tb"})
    assert "size" in text.lower(), text
    text = await c.err("exec", {"name": "agent-mcp-1"})
    assert "argv" in text, text

    # The API goes away, then comes back: an error saying so, then a working call.
    say("STOP")
    wait_for("STOPPED")
    text = await c.err("list", {})
    assert "unreachable" in text, text
    say("START")
    wait_for("STARTED")
    await c.ok("list", {"include_terminated": True})


async def killed_flow(session, tools):
    c = Checked(session, {t.name: t.inputSchema for t in tools})
    await c.ok("create", {"name": "agent-kill-1"})
    say("SLOW")
    text = await c.err("exec", {"name": "agent-kill-1", "argv": ["sleep", "5"]})
    assert "unreachable" in text and os.environ["CAPSULE_API"] in text, text
    say("ERROR " + text.replace("\n", " "))
    # Still down: a fresh call fails the same way, and the MCP server is still there.
    text = await c.err("list", {})
    assert "unreachable" in text, text
    say("DOWN")
    wait_for("STARTED")
    listed = await c.ok("list", {"include_terminated": True})
    assert "capsules" in listed, listed
    await c.ok("create", {"name": "agent-kill-2"})
    out = await c.ok("exec", {"name": "agent-kill-2", "argv": ["echo", "back"]})
    assert out["exit_code"] == 0 and "back" in out["stdout"], out


async def real_flow(session, tools):
    c = Checked(session, {t.name: t.inputSchema for t in tools})
    image = os.environ.get("CAPSULES_MCP_IMAGE", "small")
    rec = await c.ok("create", {"name": "agent-mcp-1", "size": "1x1gb", "image": image, "credit_limit": "2.00"})
    assert rec["name"] == "agent-mcp-1" and rec["state"] == "running", rec
    out = await c.ok("exec", {"name": "agent-mcp-1", "argv": ["echo", "hi"]})
    assert out["exit_code"] == 0 and "hi" in out["stdout"], out
    say("EXEC " + json.dumps(out))
    data = bytes(range(256)) + b"bin\x00\xff\xfe\x80end"
    w = await c.ok("write_file", {
        "name": "agent-mcp-1", "path": "/workspace/blob.bin",
        "content": base64.b64encode(data).decode(), "encoding": "base64",
    })
    assert w["bytes"] == len(data), w
    r = await c.ok("read_file", {"name": "agent-mcp-1", "path": "/workspace/blob.bin", "encoding": "base64"})
    assert base64.b64decode(r["content"]) == data, r
    # The guest sees the same bytes (its own sha256sum of the file).
    import hashlib
    out = await c.ok("exec", {"name": "agent-mcp-1", "argv": ["sha256sum", "/workspace/blob.bin"]})
    assert out["stdout"].split()[0] == hashlib.sha256(data).hexdigest(), out
    t = await c.ok("terminate", {"name": "agent-mcp-1"})
    assert t["state"] == "terminated", t
    u = await c.ok("usage", {"name": "agent-mcp-1"})
    assert u["usage"]["compute_minutes"] >= 1, u
    say("USAGE " + json.dumps(u["usage"]))


async def http_flow(session, tools):
    assert {t.name for t in tools} == EXPECTED_TOOLS, tools
    c = Checked(session, {t.name: t.inputSchema for t in tools})
    await c.ok("create", {"name": "agent-http-1"})
    out = await c.ok("exec", {"name": "agent-http-1", "argv": ["echo", "hi"]})
    assert out["exit_code"] == 0 and "hi" in out["stdout"], out
    text = await c.err("create", {"name": "other-http"})
    assert "prefix" in text, text
    t = await c.ok("terminate", {"name": "agent-http-1"})
    assert t["state"] == "terminated", t


async def over_http(url, body):
    async with streamablehttp_client(url) as (read, write, _session_id):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            await body(session, tools)


async def main(binary, mode):
    flows = {"mock": mock_flow, "killed": killed_flow, "real": real_flow}
    if mode == "http":
        await over_http(os.environ["CAPSULE_MCP_URL"], http_flow)
    else:
        await session_for(binary, flows[mode])
    say("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mock"))
