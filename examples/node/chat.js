#!/usr/bin/env node
// Node.js client of qwen-serve: streams a chat with an image and a tool call,
// answers the call with a local function, streams the follow-up, and prints
// every event as one JSON line: {"turn": 1, "type": "delta", ...}.
//
//   npm ci && node chat.js --target 127.0.0.1:50051 [--image cat.png]
//
// The .proto is loaded at run time with @grpc/proto-loader: no code generation.
// With the tiny random development model add --force-tool-call: it constrains
// the output (structured_output.regex, thinking off) to a get_weather call, so
// the event stream is real engine + parser output in the exact shape a real
// model produces.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const zlib = require('node:zlib');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = process.env.QWEN_SERVE_PROTOS || path.join(__dirname, '..', '..', 'protos');

const GET_WEATHER = {
  name: 'get_weather',
  description: 'Current weather for a city',
  parameters_json_schema: JSON.stringify({
    type: 'object',
    properties: { city: { type: 'string', description: 'City name' } },
    required: ['city'],
  }),
};
const FORCED_CALL =
  '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>';

// The local implementation of the tool the model may call.
function getWeather({ city }) {
  return { city, sky: 'sunny', temperature_c: 21 };
}

function loadInference() {
  const definition = protoLoader.loadSync('qwen_serve/api/v1/serve.proto', {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto (max_tokens, not maxTokens)
    longs: String,
    enums: String, // enum values by name ("FINISH_REASON_TOOL_CALLS")
    defaults: false, // print only the fields the server set
    oneofs: true, // event.event names the member that is set
  });
  return grpc.loadPackageDefinition(definition).qwen_serve.api.v1.Inference;
}

// A solid-colour PNG, so the example needs no image file or image library.
function solidPng(width, height, [r, g, b]) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc32 = (buf) => {
    let crc = 0xffffffff;
    for (const byte of buf) crc = crcTable[(crc ^ byte) & 0xff] ^ (crc >>> 8);
    return (crc ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const out = Buffer.alloc(body.length + 8);
    out.writeUInt32BE(data.length, 0);
    body.copy(out, 4);
    out.writeUInt32BE(crc32(body), body.length + 4);
    return out;
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8); // 8-bit RGB, no interlace
  const row = Buffer.alloc(1 + width * 3); // filter byte 0, then pixels
  for (let x = 0; x < width; x++) row.set([r, g, b], 1 + 3 * x);
  const pixels = zlib.deflateSync(Buffer.concat(Array(height).fill(row)));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', header),
    chunk('IDAT', pixels),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

function escapeRegex(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

// Streams one Chat call, printing each event; resolves with the Finished events.
// A failure rejects with the call's gRPC status. Before Started it is the only sign;
// after Started an `error` event comes first and the status repeats its code and
// details (err.afterStarted is then that event).
function streamChat(client, request, { turn, apiKey, timeoutS }) {
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.add('authorization', `Bearer ${apiKey}`);
  const deadline = new Date(Date.now() + timeoutS * 1000);
  return new Promise((resolve, reject) => {
    const finished = [];
    let failed = null;
    const call = client.Chat(request, metadata, { deadline });
    call.on('data', (event) => {
      const kind = event.event; // started | delta | finished | usage | error
      console.log(JSON.stringify({ turn, type: kind, ...event[kind] }));
      if (kind === 'finished') finished.push(event.finished);
      if (kind === 'error') failed = event.error;
    });
    call.on('error', (err) => reject(Object.assign(err, { afterStarted: failed })));
    call.on('end', () => resolve(finished));
  });
}

function options() {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: process.env.QWEN_SERVE_TARGET || '127.0.0.1:50051' },
      'api-key': { type: 'string', default: process.env.QWEN_SERVE_API_KEY || '' },
      tls: { type: 'boolean', default: false },
      image: { type: 'string' },
      prompt: { type: 'string', default: 'What is the weather like in the city in this picture?' },
      'max-tokens': { type: 'string', default: '64' },
      timeout: { type: 'string', default: '120' },
      'force-tool-call': { type: 'boolean', default: false },
      regex: { type: 'string' }, // constrain the first turn's output to this regex
    },
  });
  return values;
}

async function main() {
  const opts = options();
  const Inference = loadInference();
  const credentials = opts.tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
  const client = new Inference(opts.target, credentials);
  const call = { apiKey: opts['api-key'], timeoutS: Number(opts.timeout) };
  const imageBytes = opts.image ? fs.readFileSync(opts.image) : solidPng(64, 64, [200, 40, 40]);
  const messages = [
    {
      role: 'ROLE_USER',
      content: [{ image: { data: imageBytes, mime_type: opts.image ? '' : 'image/png' } }, { text: opts.prompt }],
    },
  ];
  const sampling = { max_tokens: Number(opts['max-tokens']), temperature: 0 };
  const first = { messages, tools: [GET_WEATHER], sampling, enable_thinking: false };
  if (opts['force-tool-call']) first.structured_output = { regex: escapeRegex(FORCED_CALL) };
  if (opts.regex) first.structured_output = { regex: opts.regex };

  const finished = await streamChat(client, first, { turn: 1, ...call });
  const calls = finished.flatMap((f) => f.tool_calls || []);
  if (calls.length > 0) {
    // Run the tools and send their results back: assistant turn + one tool message per call.
    messages.push({ role: 'ROLE_ASSISTANT', tool_calls: calls });
    for (const toolCall of calls) {
      const result = getWeather(JSON.parse(toolCall.arguments_json || '{}'));
      messages.push({ role: 'ROLE_TOOL', tool_call_id: toolCall.id, content: [{ text: JSON.stringify(result) }] });
    }
    const followUp = { messages, tools: [GET_WEATHER], sampling: { ...sampling, max_tokens: 16 }, enable_thinking: false };
    await streamChat(client, followUp, { turn: 2, ...call });
  }
  client.close();
}

main().catch((err) => {
  const code = err.code !== undefined ? grpc.status[err.code] : 'ERROR';
  const when = err.afterStarted ? ' after Started' : '';
  // The server's retry hint, in gRPC's standard trailer (when it gives one).
  const pushback = err.metadata ? err.metadata.get('grpc-retry-pushback-ms')[0] : undefined;
  const hint = pushback !== undefined ? ` (retry in ${pushback} ms)` : '';
  console.error(`error ${code}${when}: ${err.details || err.message}${hint}`);
  process.exit(1);
});
