#!/usr/bin/env node
// Drives a comfyume gateway with a real third-party ComfyUI client,
// @saintno/comfyui-sdk, exactly as its README shows: ComfyApi (HTTP + its
// own WebSocket), PromptBuilder for the workflow and CallWrapper to queue it
// and follow the job through the SDK's own event handling, then
// ComfyApi.getImage (the SDK's /view path) for the output.
//
//   node run.mjs <gateway base URL> [--user NAME]
//
// --user NAME sends "X-User: NAME" on every request and on the WebSocket
// handshake (the SDK's "custom" credentials), for gateways that take the
// user from that header.
//
// On success it prints one JSON line
//   {"prompt_id","filename","subfolder","type","bytes","sha256","url",
//    "progress","previews","events":[...]}
// (progress/previews: CallWrapper callback counts; events: every message
// type the SDK's socket delivered, "b_preview" for a binary preview) and
// exits 0. Any failure, or no result within 30 s, exits non-zero with
// the reason (and the SDK's own log) on stderr.

import { createHash } from "node:crypto";
import { CallWrapper, ComfyApi, PromptBuilder } from "@saintno/comfyui-sdk";

const TIMEOUT_MS = 30_000;

const sdkLog = [];
let api;

function fail(msg, cause) {
  process.stderr.write(`run.mjs: ${msg}${cause !== undefined ? `: ${describe(cause)}` : ""}\n`);
  for (const line of sdkLog.slice(-40)) process.stderr.write(`  sdk: ${line}\n`);
  try {
    api?.destroy();
  } catch {}
  process.exit(1);
}

function describe(v) {
  if (v instanceof Error) {
    const cause = v.cause !== undefined ? ` (cause: ${describe(v.cause)})` : "";
    return `${v.name}: ${v.message}${cause}`;
  }
  if (typeof Response !== "undefined" && v instanceof Response) return `HTTP ${v.status} ${v.url}`;
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

function parseArgs(argv) {
  const out = { base: "", user: "" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--user") out.user = argv[++i] ?? "";
    else if (a.startsWith("--user=")) out.user = a.slice("--user=".length);
    else if (!out.base) out.base = a;
    else fail(`unexpected argument ${a}`);
  }
  if (!/^https?:\/\/[^/]+$/.test(out.base.replace(/\/+$/, ""))) {
    fail("usage: node run.mjs <http://host:port> [--user NAME]");
  }
  out.base = out.base.replace(/\/+$/, "");
  return out;
}

// EmptyImage → FakeSampler → SaveImage, in API format; PromptBuilder sets
// the real values (64x48, 3 steps, prefix "sdk") below.
const workflowJSON = {
  "1": {
    class_type: "EmptyImage",
    inputs: { width: 512, height: 512, batch_size: 1, color: 0x8e6eed },
  },
  "2": { class_type: "FakeSampler", inputs: { image: ["1", 0], steps: 20 } },
  "3": { class_type: "SaveImage", inputs: { images: ["2", 0], filename_prefix: "ComfyUI" } },
};

async function main() {
  const { base, user } = parseArgs(process.argv.slice(2));
  const timer = setTimeout(() => fail(`no result within ${TIMEOUT_MS / 1000}s`), TIMEOUT_MS);

  const opts = { wsTimeout: 10_000 };
  if (user) opts.credentials = { type: "custom", headers: { "X-User": user } };
  api = new ComfyApi(base, ComfyApi.generateId(), opts);

  // Everything the SDK's socket delivers, in order: JSON messages by type
  // (its "all" event) and binary previews (its "b_preview" event).
  const events = [];
  let wsConnected = false;
  api.on("all", (ev) => events.push(ev.detail.type));
  api.on("b_preview", () => events.push("b_preview"));
  api.on("connected", () => {
    wsConnected = true;
  });
  const ended = new Set(); // prompt_ids whose execution_success came
  api.on("execution_success", (ev) => ended.add(ev.detail?.prompt_id));
  api.on("log", (ev) => {
    const d = ev.detail;
    if (d.fnName === "on" || d.fnName === "off") return; // listener bookkeeping
    sdkLog.push(`${d.fnName ?? ""} ${d.message ?? d.msg ?? ""} ${d.data !== undefined ? describe(d.data) : ""}`.trim());
  });
  api.on("auth_error", (ev) => fail("gateway refused the SDK's credentials", ev.detail));
  api.on("connection_error", (ev) => fail("SDK could not connect", ev.detail));
  api.on("websocket_unavailable", (ev) => fail("SDK fell back to polling: WebSocket unavailable", ev.detail));

  // init pings GET /prompt until it answers, reads /system_stats, probes
  // extensions and opens the WebSocket; waitForReady resolves after that.
  api.init(5, 500);
  await api.waitForReady();
  for (let i = 0; !wsConnected && i < 100; i++) await new Promise((r) => setTimeout(r, 50));
  if (!wsConnected) fail("SDK WebSocket did not open");

  const workflow = new PromptBuilder(workflowJSON, ["width", "height", "steps", "prefix"], ["images"])
    .setInputNode("width", "1.inputs.width")
    .setInputNode("height", "1.inputs.height")
    .setInputNode("steps", "2.inputs.steps")
    .setInputNode("prefix", "3.inputs.filename_prefix")
    .setOutputNode("images", "3")
    .input("width", 64)
    .input("height", 48)
    .input("steps", 3)
    .input("prefix", "sdk");

  let failure = null;
  let promptId = null;
  let progress = 0;
  let previews = 0;
  const result = await new CallWrapper(api, workflow)
    .onPending((id) => {
      promptId = id;
    })
    .onProgress(() => progress++)
    .onPreview(() => previews++)
    .onFailed((err) => {
      failure = err;
    })
    .run();
  if (failure) fail("CallWrapper reported a failed job", failure);
  if (!result) fail("CallWrapper finished without outputs");

  if (!promptId) fail("CallWrapper never reported the queued prompt_id");
  const images = result.images?.images;
  if (!Array.isArray(images) || images.length !== 1) fail("SaveImage output has no single image", result);
  const img = images[0];
  if (!img.filename || img.type !== "output") fail("unexpected output ref", img);

  // The SDK's own /view request.
  const blob = await api.getImage(img);
  const bytes = Buffer.from(await blob.arrayBuffer());
  const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (bytes.length < PNG.length || !bytes.subarray(0, PNG.length).equals(PNG)) {
    fail(`GET ${api.getPathImage(img)} did not return a PNG`, bytes.subarray(0, 200).toString());
  }

  // A finished job is in the history, as CallWrapper's own recovery path
  // (after a reconnect) expects. CallWrapper resolves on the output node's
  // executed event, before the job's end; like ComfyUI, the gateway
  // records the job as completed with its execution_success, which the SDK
  // reads the history after.
  while (!ended.has(promptId)) await new Promise((r) => setTimeout(r, 20));
  const hist = await api.getHistory(promptId);
  if (!hist?.status?.completed) fail(`history of ${promptId} is not completed`, hist);

  clearTimeout(timer);
  process.stdout.write(
    JSON.stringify({
      prompt_id: promptId,
      filename: img.filename,
      subfolder: img.subfolder ?? "",
      type: img.type,
      bytes: bytes.length,
      sha256: createHash("sha256").update(bytes).digest("hex"),
      url: api.getPathImage(img),
      progress,
      previews,
      events,
    }) + "\n",
  );
  api.destroy();
  process.exit(0);
}

main().catch((err) => fail("unexpected error", err));
