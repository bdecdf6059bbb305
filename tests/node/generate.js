// A client in another language: calls the router's RouterService/Generate with
// @grpc/grpc-js, loading the contract straight from protos/, and prints one JSON
// line with the streamed text, the finish reason and the usage.
//
//   node generate.js <router host:port> <prompt> <max tokens>
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, prompt, maxTokens] = process.argv.slice(2);
const protos = path.resolve(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("stagemesh/v1/router.proto", {
  includeDirs: [protos],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const { RouterService } = grpc.loadPackageDefinition(definition).stagemesh.v1;
const client = new RouterService(address, grpc.credentials.createInsecure());

const deadline = new Date(Date.now() + 300_000);
const call = client.Generate(
  { text: prompt, sampling: { temperature: 0, max_tokens: Number(maxTokens) } },
  { deadline },
);
let text = "";
let finish = null;
let usage = null;
call.on("data", (delta) => {
  text += delta.text;
  if (delta.finish_reason !== "FINISH_REASON_UNSPECIFIED") finish = delta.finish_reason;
  if (delta.usage) usage = delta.usage;
});
call.on("error", (error) => {
  console.error(`Generate failed: ${error.code} ${error.details}`);
  process.exit(1);
});
call.on("end", () => {
  console.log(JSON.stringify({ text, finish, usage }));
  client.close();
});
