"""The Python SDK's client answering vmcp's elicitation (crates/cli/tests/mcp_serve_interop.rs).

usage: py_elicit.py approve|deny SERVER_COMMAND...   (stdio)
       py_elicit.py approve|deny http URL           (Streamable HTTP)
The server runs with a policy that asks before `sandbox_list` and denies `sandbox_destroy`.
The elicitation callback checks the question, answers approve or deny, and the script checks
the tool result. Prints one line per check and `OK` at the end.
"""

import asyncio
import sys

from mcp import Client, StdioServerParameters, types


async def main():
    answer, target = sys.argv[1], sys.argv[2:]
    asked = []

    async def on_elicit(context, params):
        asked.append(params)
        assert "sandbox_list" in params.message, params.message
        assert params.requested_schema["properties"]["approve"]["type"] == "boolean"
        return types.ElicitResult(action="accept", content={"approve": answer == "approve"})

    if target[0] == "http":
        server = target[1]
    else:
        server = StdioServerParameters(command=target[0], args=target[1:])
    async with Client(server, mode="legacy", elicitation_callback=on_elicit) as c:
        r = (await c.call_tool("sandbox_list", {})).model_dump(by_alias=True, exclude_none=True)
        assert len(asked) == 1, asked
        print("asked:", asked[0].message.splitlines()[0])
        if answer == "approve":
            assert not r.get("isError"), r
            assert r["structuredContent"]["sandboxes"] == [], r
            print("approved call ran")
        else:
            assert r.get("isError") is True, r
            text = r["content"][0]["text"]
            assert "sandbox_list was not run: denied: denied in the MCP client" in text, text
            print("denied call:", text)
        r = (await c.call_tool("sandbox_destroy", {"sandbox_id": "sb-x"})).model_dump(by_alias=True, exclude_none=True)
        assert r.get("isError") is True, r
        assert "denied by the approval policy's rule at line" in r["content"][0]["text"], r
        assert len(asked) == 1, "a deny rule asks nobody"
        print("deny rule:", r["content"][0]["text"])
        print("OK")


asyncio.run(main())
