// llama.cpp itself (through node-llama-cpp's prebuilt binary) on a GGUF file: the token ids it makes of
// each text, and its greedy continuation of each prompt given as token ids. The tests compare both with
// transformers. Usage: node llama_cpp.mjs MODEL.gguf REQUEST.json  (REQUEST: {texts, prompts, max_new_tokens})
import fs from "node:fs";
import {getLlama} from "node-llama-cpp";

const [, , modelPath, requestPath] = process.argv;
const request = JSON.parse(fs.readFileSync(requestPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const tokens = request.texts.map((text) => Array.from(model.tokenize(text, false)));
const context = await model.createContext({contextSize: 512});
const sequence = context.getSequence();
const answers = [];
for (const prompt of request.prompts) {
  await sequence.clearHistory();
  const answer = [];
  for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
    answer.push(token);
    if (answer.length >= request.max_new_tokens || model.isEogToken(token)) break;
  }
  answers.push(answer);
}
console.log(JSON.stringify({tokens, answers}));
await context.dispose();
await model.dispose();
