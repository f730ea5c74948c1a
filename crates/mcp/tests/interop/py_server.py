"""A small MCP server on the official Python SDK, for vmcp's interoperability tests.

Usage: py_server.py stdio
       py_server.py http PORT        (Streamable HTTP with sessions, on 127.0.0.1)
       py_server.py stateless PORT   (Streamable HTTP without sessions, on 127.0.0.1)
"""

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("vmcp-interop-py", version="1.0.0")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def echo(message: str) -> str:
    """Returns the message unchanged."""
    return message


@server.resource("interop://greeting", mime_type="text/plain")
def greeting() -> str:
    """A fixed text resource."""
    return "hello from the python sdk"


@server.prompt()
def review(code: str) -> str:
    """Asks for a code review."""
    return f"Please review this code: {code}"


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "stdio"
    if mode == "stdio":
        server.run()
    elif mode in ("http", "stateless"):
        port = int(sys.argv[2])
        server.run(
            "streamable-http",
            host="127.0.0.1",
            port=port,
            stateless_http=(mode == "stateless"),
        )
    else:
        sys.exit(f"unknown mode {mode!r}: use stdio, http PORT or stateless PORT")


if __name__ == "__main__":
    main()
