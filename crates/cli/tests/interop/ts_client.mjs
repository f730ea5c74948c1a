// The TypeScript SDK's client against `vmcp mcp serve` (crates/cli/tests/mcp_serve_interop.rs).
// usage: node ts_client.mjs SDK_DIR stdio|http TARGET...   (SDK_DIR: .../@modelcontextprotocol/sdk)
// Lists every tool, calls sandbox_list, an invalid argument and a not-yet tool; prints `OK <version>`.
import { pathToFileURL } from "node:url";

const [sdkDir, kind, ...target] = process.argv.slice(2);
const load = (p) => import(pathToFileURL(`${sdkDir}/dist/esm/${p}`).href);
const { Client } = await load("client/index.js");
const client = new Client({ name: "vmcp-interop", version: "1" });
let transport;
if (kind === "stdio") {
  const { StdioClientTransport } = await load("client/stdio.js");
  transport = new StdioClientTransport({ command: target[0], args: target.slice(1), stderr: "ignore" });
} else {
  const { StreamableHTTPClientTransport } = await load("client/streamableHttp.js");
  transport = new StreamableHTTPClientTransport(new URL(target[0]));
}
const fail = (msg) => { console.log("FAIL", msg); process.exit(1); };
await client.connect(transport);
const { tools } = await client.listTools();
const byName = Object.fromEntries(tools.map((t) => [t.name, t]));
for (const n of ["sandbox_create", "sandbox_exec", "sandbox_exec_start", "sandbox_exec_poll", "sandbox_exec_write_stdin",
  "sandbox_exec_signal", "sandbox_read_file", "sandbox_write_file", "sandbox_list_files", "sandbox_list",
  "sandbox_destroy", "run", "sandbox_checkpoint", "sandbox_rewind", "sandbox_fork"]) {
  if (!byName[n]) fail(`missing tool ${n}`);
}
if (byName.sandbox_list.annotations.readOnlyHint !== true) fail("readOnlyHint");
if (byName.sandbox_destroy.annotations.destructiveHint !== true) fail("destructiveHint");
console.log("tools listed:", tools.length);
let r = await client.callTool({ name: "sandbox_list", arguments: {} });
if (r.isError || JSON.stringify(r.structuredContent.sandboxes) !== "[]") fail(JSON.stringify(r));
console.log("sandbox_list ok");
r = await client.callTool({ name: "sandbox_create", arguments: { cpus: 1000 } });
if (!r.isError || !r.content[0].text.includes("cpus: must be <=")) fail(JSON.stringify(r));
console.log("invalid argument ok:", r.content[0].text);
r = await client.callTool({ name: "sandbox_fork", arguments: { sandbox_id: "sb-x" } });
if (!r.isError || !r.content[0].text.includes("no sandbox")) fail(JSON.stringify(r));
await client.ping();
const version = transport.protocolVersion ?? client.getServerVersion()?.name;
await client.close();
console.log("OK", version);
