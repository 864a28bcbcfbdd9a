// A minimal MCP-client agent for an ironvmm guest: it spawns `iron mcp` (the
// guest's MCP stdio bridge to the host's gate), lists the tools the policy could
// allow, calls one, and prints one JSON line with what it saw.
//
//   node agent.mjs [TOOL [JSON_ARGUMENTS]]    (default: fs.read of /workspace/hello.txt)
//
// $IRON_MCP_COMMAND overrides the bridge command ("iron" by default); the rest of
// the environment (e.g. $IRON_GATE) is passed to it. Exit 0 when the call was
// answered (allowed or denied: a denial is a result the agent reads), 1 otherwise.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const tool = process.argv[2] ?? "fs.read";
const args = JSON.parse(process.argv[3] ?? '{"path": "/workspace/hello.txt"}');

const transport = new StdioClientTransport({
  command: process.env.IRON_MCP_COMMAND ?? "iron",
  args: ["mcp"],
  // The SDK passes only a few variables by default; iron needs $IRON_GATE when set.
  env: { ...process.env },
  stderr: "inherit",
});
const client = new Client({ name: "ironvmm-byo-node-agent", version: "1.0.0" });

try {
  await client.connect(transport);
  const { tools } = await client.listTools();
  const result = await client.callTool({ name: tool, arguments: args });
  console.log(
    JSON.stringify({
      node: process.version,
      server: client.getServerVersion(),
      tools: tools.map((t) => t.name).sort(),
      tool,
      is_error: result.isError ?? false,
      structured: result.structuredContent ?? null,
      text: result.content?.[0]?.text ?? null,
    }),
  );
  await client.close();
} catch (e) {
  console.error(`agent: ${e?.message ?? e}`);
  await client.close().catch(() => {});
  process.exit(1);
}
