"""A tiny MCP server over stdio for the stdio transport tests (legacy or modern, or silent
on unknown methods, or slow-modern: answers its first server/discover late, then refuses
initialize as the Python SDK does). Usage: stdio_server.py [legacy|modern|silent|slow-modern] [PIDFILE]"""
import json
import os
import sys

mode = sys.argv[1] if len(sys.argv) > 1 else "legacy"
slow_start = mode == "slow-modern"
if slow_start:
    mode = "modern"
if len(sys.argv) > 2:
    # Records our pid and our child's, to check both die with the client.
    child = os.fork()
    if child == 0:
        import time
        while True:
            time.sleep(1)
    with open(sys.argv[2], "w") as f:
        f.write(f"{os.getpid()} {child}\n")

print("a banner line that is not JSON-RPC", flush=True)
print("server starting", file=sys.stderr, flush=True)


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


pending_ping = None
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    msg = json.loads(line)
    method = msg.get("method")
    mid = msg.get("id")
    if method is None:
        if mid == "srv-ping":
            # The client's answer to our ping: finish the deferred call.
            send({"jsonrpc": "2.0", "id": pending_ping,
                  "result": {"content": [{"type": "text", "text": "pong=" + json.dumps(msg.get("result"))}]}})
        continue
    if mid is None:
        continue  # notifications
    meta = (msg.get("params") or {}).get("_meta") or {}
    modern_req = "io.modelcontextprotocol/protocolVersion" in meta
    if method == "server/discover":
        if slow_start:
            import time
            time.sleep(0.6)
            slow_start = False
        if mode == "modern":
            send({"jsonrpc": "2.0", "id": mid, "result": {"supportedVersions": ["2026-07-28"],
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "py", "version": "1"}, "resultType": "complete"}})
        elif mode == "silent":
            pass
        else:
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "Method not found"}})
        continue
    if method == "initialize":
        if mode == "modern" and len(sys.argv) > 1 and sys.argv[1] == "slow-modern":
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32022, "message": "serving 2026-07-28"}})
        elif mode == "modern":
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "no initialize"}})
        else:
            send({"jsonrpc": "2.0", "id": mid, "result": {"protocolVersion": "2025-06-18",
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "py", "version": "1"}}})
        continue
    if mode == "modern" and not modern_req:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32022, "message": "unsupported"}})
        continue
    if method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}})
    elif method == "tools/call":
        name = msg["params"]["name"]
        if name == "echo":
            text = msg["params"].get("arguments", {}).get("message", "")
            send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "echoing"}})
            send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": text}]}})
        elif name == "ping-me":
            pending_ping = mid
            send({"jsonrpc": "2.0", "id": "srv-ping", "method": "ping"})
        elif name == "exit":
            sys.exit(0)
        else:
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32602, "message": "unknown tool"}})
    else:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "Method not found"}})
