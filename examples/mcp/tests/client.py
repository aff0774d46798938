"""Drives `capsule-mcp` with the official MCP Python SDK (run by tests/mcp_client.rs).

    python3 client.py <path to capsule-mcp>

CAPSULE_API and CAPSULE_TOKEN come from the environment. Talks to the Rust test on stdout/stdin:
prints STOP and waits for STOPPED (the HTTP server is down), prints START and waits for STARTED,
prints OK at the end. Any failed check raises, and the script exits non-zero.
"""

import asyncio
import base64
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

try:
    import jsonschema
except ImportError:  # required keys only
    jsonschema = None

STREAM_CAP = 16 * 1024
EXPECTED_TOOLS = {
    "create", "list", "status", "exec", "write_file", "read_file", "list_files",
    "usage", "sleep", "wake", "terminate",
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


async def main(binary):
    params = StdioServerParameters(command=binary, args=[], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
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
    say("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
