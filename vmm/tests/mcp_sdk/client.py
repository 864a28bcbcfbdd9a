"""A client of the official MCP Python SDK (`pip install mcp`) against the gate.

Usage: client.py [--env NAME=VALUE]... COMMAND [ARGS...]

COMMAND is an MCP stdio server: `ironvmm gate --stdio ...`, or `iron mcp` (the
guest's bridge) with `--env IRON_GATE=unix:SOCKET`. The SDK passes only a safe
subset of the environment to the server, so --env adds to it.

It expects the policy of vmm/tests/gate_mcp_sdk.rs: fs.read allowed under
/workspace, fs.write denied by rule 5 ("read-only here"). Every check is an
assertion; the last line printed is a JSON summary of what the SDK saw.
"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import get_default_environment, stdio_client

try:  # SDK 2.x
    from mcp import MCPError as SdkError
except ImportError:  # SDK 1.x
    from mcp.shared.exceptions import McpError as SdkError


def field(obj, snake):
    """SDK 2.x names fields in snake_case, 1.x as on the wire (camelCase)."""
    if hasattr(obj, snake):
        return getattr(obj, snake)
    head, *rest = snake.split("_")
    return getattr(obj, head + "".join(w.title() for w in rest))


def error_code(e):
    err = getattr(e, "error", None)
    return getattr(err, "code", getattr(e, "code", None))


async def main(argv):
    env = get_default_environment()
    while argv and argv[0] == "--env":
        name, _, value = argv[1].partition("=")
        env[name] = value
        argv = argv[2:]
    server = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
    seen = {}
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            assert field(init, "server_info").name == "ironvmm", init
            assert field(init, "protocol_version") in ("2025-06-18", "2025-11-25"), init
            assert init.capabilities.tools is not None, init
            seen["protocol_version"] = field(init, "protocol_version")

            tools = await session.list_tools()
            names = sorted(t.name for t in tools.tools)
            # Only tools some rule could allow or ask (fs.write is denied outright).
            assert names == ["fs.delete", "fs.read", "fs.stat"], names
            for t in tools.tools:
                assert field(t, "input_schema").get("type") == "object", t
            seen["tools"] = names

            ok = await session.call_tool("fs.read", {"path": "/workspace/hello.txt"})
            assert not field(ok, "is_error"), ok
            assert field(ok, "structured_content")["content"] == "hello\n", ok
            assert ok.content[0].type == "text", ok
            seen["allowed"] = field(ok, "structured_content")

            # A denial is a tool result the model can read, not an exception.
            denied = await session.call_tool(
                "fs.write", {"path": "/workspace/x", "content": "x"}
            )
            assert field(denied, "is_error"), denied
            d = field(denied, "structured_content")
            assert d == {
                "decision": "deny",
                "rule": 5,
                "decided_by": "rule",
                "reason": "read-only here",
            }, d
            text = denied.content[0].text
            assert text == "denied by rule 5 (decided by rule): read-only here", text
            seen["denied"] = d

            # Invalid arguments: a tool result with isError too (an invariant denial).
            bad = await session.call_tool("fs.read", {"path": 7})
            assert field(bad, "is_error"), bad
            assert field(bad, "structured_content")["decided_by"] == "invariant", bad
            seen["invalid_arguments"] = field(bad, "structured_content")

            # An unknown tool is a protocol error (-32602), which the SDK raises.
            try:
                r = await session.call_tool("no.such_tool", {})
                raise AssertionError(f"an unknown tool was answered: {r}")
            except SdkError as e:
                assert error_code(e) == -32602, e
                assert "Unknown tool: no.such_tool" in str(e), e
                seen["unknown_tool"] = error_code(e)

            await session.send_ping()
    print(json.dumps(seen, sort_keys=True))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1:]))
