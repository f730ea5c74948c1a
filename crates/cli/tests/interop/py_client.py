"""The Python SDK's client against `vmcp mcp serve` (crates/cli/tests/mcp_serve_interop.rs).

usage: py_client.py stdio|http MODE vm|novm TARGET...
  MODE: legacy (initialize handshake) or auto (server/discover first: 2026-07-28 against us)
  TARGET: the server command (stdio) or the endpoint URL (http)
Prints one line per check and `OK <protocol version>` at the end; exits non-zero on a failure.
"""

import asyncio
import sys

from mcp import Client, StdioServerParameters


def dump(model):
    return model.model_dump(by_alias=True, exclude_none=True)


async def call(c, name, args):
    r = dump(await c.call_tool(name, args))
    return r


async def main():
    kind, mode, vm = sys.argv[1], sys.argv[2], sys.argv[3] == "vm"
    target = sys.argv[4:]
    server = StdioServerParameters(command=target[0], args=target[1:]) if kind == "stdio" else target[0]
    async with Client(server, mode=mode) as c:
        version = c.protocol_version
        expected = "2026-07-28" if mode == "auto" else "2025-11-25"
        assert version == expected, f"negotiated {version}, expected {expected}"
        tools = {t["name"]: t for t in (dump(t) for t in (await c.list_tools()).tools)}
        for name in ["sandbox_create", "sandbox_exec", "sandbox_exec_start", "sandbox_exec_poll",
                     "sandbox_exec_write_stdin", "sandbox_exec_signal", "sandbox_read_file",
                     "sandbox_write_file", "sandbox_list_files", "sandbox_list", "sandbox_destroy",
                     "run", "sandbox_checkpoint", "sandbox_rewind", "sandbox_fork"]:
            assert name in tools, f"missing tool {name}"
        assert tools["sandbox_list"]["annotations"]["readOnlyHint"] is True
        assert tools["sandbox_destroy"]["annotations"]["destructiveHint"] is True
        assert "outputSchema" in tools["sandbox_exec"]
        print("tools listed:", len(tools))
        r = await call(c, "sandbox_list", {})
        assert not r.get("isError"), r
        assert r["structuredContent"]["sandboxes"] == [], r
        print("sandbox_list ok")
        r = await call(c, "sandbox_create", {"cpus": 1000})
        assert r.get("isError") is True, r
        assert "cpus: must be <=" in r["content"][0]["text"], r
        print("invalid argument ok:", r["content"][0]["text"])
        r = await call(c, "sandbox_fork", {"sandbox_id": "sb-x"})
        assert r.get("isError") is True and "no sandbox" in r["content"][0]["text"], r
        if version != "2026-07-28":  # ping is gone in 2026-07-28
            await c.send_ping()
        if vm:
            r = await call(c, "sandbox_create", {})
            assert not r.get("isError"), r
            sid = r["structuredContent"]["sandbox_id"]
            r = await call(c, "sandbox_exec", {"sandbox_id": sid, "command": "echo hi; exit 2"})
            s = r["structuredContent"]
            assert (s["stdout"], s["exit_code"]) == ("hi\n", 2), s
            r = await call(c, "sandbox_write_file", {"sandbox_id": sid, "path": "/tmp/p", "content": "py"})
            assert not r.get("isError"), r
            r = await call(c, "sandbox_read_file", {"sandbox_id": sid, "path": "/tmp/p"})
            assert r["structuredContent"]["content"] == "py", r
            r = await call(c, "sandbox_list_files", {"sandbox_id": sid, "path": "/tmp"})
            assert any(e["name"] == "p" for e in r["structuredContent"]["entries"]), r
            r = await call(c, "sandbox_exec_start", {"sandbox_id": sid, "command": "echo bg; sleep 100", "stdin_open": True})
            pid = r["structuredContent"]["process_id"]
            r = await call(c, "sandbox_exec_poll", {"sandbox_id": sid, "process_id": pid, "wait_ms": 5000})
            assert r["structuredContent"]["stdout"] == "bg\n", r
            r = await call(c, "sandbox_exec_write_stdin", {"sandbox_id": sid, "process_id": pid, "data": "", "close": True})
            assert not r.get("isError"), r
            r = await call(c, "sandbox_exec_signal", {"sandbox_id": sid, "process_id": pid, "signal": "SIGKILL"})
            assert not r.get("isError"), r
            r = await call(c, "sandbox_destroy", {"sandbox_id": sid})
            assert r["structuredContent"]["destroyed"] is True, r
            r = await call(c, "run", {"argv": ["true"]})
            assert r["structuredContent"]["exit_code"] == 0, r
            print("vm tools ok")
        print("OK", version)


asyncio.run(main())
