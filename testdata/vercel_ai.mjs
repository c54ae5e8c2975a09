// The Vercel AI SDK (npm `ai` and `@ai-sdk/openai`) against this server: generateText and streamText, on chat
// completions and on the Responses API, each offered one tool without `execute`, so the SDK hands back the
// model's calls instead of running them. Prints one JSON object: for each run its text, tool calls and finish
// reason, and for the streamed runs the kinds of stream parts, in order, with repeats folded.
//
//   OPENAI_API_KEY=<key> node testdata/vercel_ai.mjs http://127.0.0.1:8000/v1 [packages folder]
//
// The packages folder (default: ./.cli/ai, where the README's test command installs them) holds node_modules/.
// Its ES module builds are loaded by path: a bare `import "ai"` only looks in node_modules beside this file.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const [baseURL, folder = fileURLToPath(new URL("../.cli/ai", import.meta.url))] = process.argv.slice(2);
const require = createRequire(join(resolve(folder), "node_modules", "noop.js"));

async function load(name) {
  const manifest = require.resolve(`${name}/package.json`);
  const entry = JSON.parse(readFileSync(manifest, "utf8")).exports["."];
  return import(pathToFileURL(join(dirname(manifest), entry.import ?? entry.default ?? entry)).href);
}

const { generateText, streamText, tool } = await load("ai");
const { createOpenAI } = await load("@ai-sdk/openai");
const { z } = await load("zod");

const provider = createOpenAI({ baseURL, apiKey: process.env.OPENAI_API_KEY });
// WEATHER's parameters in the test file: a required city and an optional unit, nothing else.
const tools = {
  get_weather: tool({
    description: "Weather for a city",
    inputSchema: z.object({ city: z.string(), unit: z.enum(["c", "f"]).optional() }),
  }),
};
const ask = { tools, prompt: "Paris and Rome?", maxRetries: 0 };

function calls(toolCalls) {
  return toolCalls.map(({ toolCallId, toolName, input }) => ({ toolCallId, toolName, input }));
}

async function plain(model) {
  const result = await generateText({ model, ...ask });
  return { text: result.text, toolCalls: calls(result.toolCalls), finishReason: result.finishReason };
}

async function streamed(model) {
  const errors = [];
  const result = streamText({ model, ...ask, onError: ({ error }) => errors.push(String(error)) });
  const parts = [];
  for await (const part of result.fullStream) {
    if (parts.at(-1) !== part.type) parts.push(part.type);
  }
  const [text, toolCalls, finishReason] = await Promise.all([result.text, result.toolCalls, result.finishReason]);
  return { text, toolCalls: calls(toolCalls), finishReason, parts, errors };
}

async function run(how, model) {
  try {
    return await how(model);
  } catch (error) {
    return { error: String(error), cause: error?.responseBody ?? String(error?.cause ?? "") };
  }
}

// One after another, as an app would make them: one CLI at a time on the machine.
const out = {
  chat: await run(plain, provider.chat("sonnet")),
  chatStream: await run(streamed, provider.chat("sonnet")),
  responses: await run(plain, provider.responses("sonnet")),
  responsesStream: await run(streamed, provider.responses("sonnet")),
};
console.log(JSON.stringify(out));
