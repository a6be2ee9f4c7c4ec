// Generation settings read back from a PNG: its tEXt/zTXt/iTXt ``parameters`` chunk, in
// AUTOMATIC1111's infotext format, parsed in the page.

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

const latin1 = (bytes) => new TextDecoder("latin1").decode(bytes);
const utf8 = (bytes) => new TextDecoder("utf-8").decode(bytes);

function* chunks(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = SIGNATURE.length;
  while (at + 8 <= bytes.length) {
    const length = view.getUint32(at);
    const type = latin1(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, Math.min(at + 8 + length, bytes.length));
    yield { type, data };
    if (type === "IEND") return;
    at += 12 + length;
  }
}

async function textOf({ type, data }) {
  const nul = data.indexOf(0);
  if (nul < 0) return null;
  const keyword = latin1(data.subarray(0, nul));
  if (type === "tEXt") return [keyword, latin1(data.subarray(nul + 1))];
  if (type === "zTXt") return [keyword, latin1(await inflate(data.subarray(nul + 2)))];
  // iTXt: keyword, compression flag, method, language tag\0, translated keyword\0, text
  const compressed = data[nul + 1] === 1;
  const language = data.indexOf(0, nul + 3);
  const translated = data.indexOf(0, language + 1);
  const text = data.subarray(translated + 1);
  return [keyword, utf8(compressed ? await inflate(text) : text)];
}

/** The text chunks of a PNG as ``{keyword: text}``; throws if ``bytes`` is not a PNG. */
export async function pngText(bytes) {
  if (!SIGNATURE.every((byte, i) => bytes[i] === byte)) throw new Error("not a PNG file");
  const texts = {};
  for (const chunk of chunks(bytes)) {
    if (!["tEXt", "zTXt", "iTXt"].includes(chunk.type)) continue;
    const entry = await textOf(chunk);
    if (entry) texts[entry[0]] = entry[1];
  }
  return texts;
}

// A1111's re_param: "Key: value" pairs, a value either quoted (with \" escapes) or up to a comma.
const PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

function unquote(value) {
  if (!value.startsWith('"') || !value.endsWith('"')) return value;
  try {
    return JSON.parse(value);
  } catch {
    return value.slice(1, -1);
  }
}

/**
 * AUTOMATIC1111's infotext (as its parse_generation_parameters reads it): the prompt lines,
 * an optional "Negative prompt: ..." (possibly over several lines), and a last line of
 * "Key: value" pairs. Returns ``{prompt, negativePrompt, params: {Key: value}}``.
 */
export function parseInfotext(text) {
  const lines = text.trim().split("\n");
  let last = lines.pop() ?? "";
  if ([...last.matchAll(PARAM)].length < 3) {
    lines.push(last);
    last = "";
  }
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (const line of lines) {
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      negative.push(line.slice("Negative prompt:".length).trim());
    } else {
      (inNegative ? negative : prompt).push(line);
    }
  }
  const params = {};
  for (const [, key, value] of last.matchAll(PARAM)) params[key.trim()] = unquote(value.trim());
  return { prompt: prompt.join("\n"), negativePrompt: negative.join("\n"), params };
}

/** "name: hash, name: hash" (A1111's "Lora hashes") as ``[[name, hash], ...]``. */
export function parseLoraHashes(value) {
  if (!value) return [];
  return value
    .split(",")
    .map((pair) => pair.split(":").map((part) => part.trim()))
    .filter((pair) => pair.length === 2 && pair[0] && pair[1]);
}

/** The LoRAs of "Lora hashes" with their weights from DAN's "Lora weights" (1 where it does
 * not say): ``[[name, hash, weight], ...]``. */
export function parseLoras(hashes, weights) {
  const weightOf = new Map(
    parseLoraHashes(weights).map(([name, weight]) => [name, Number(weight)]),
  );
  return parseLoraHashes(hashes).map(([name, hash]) => {
    const weight = weightOf.get(name);
    return [name, hash, Number.isFinite(weight) ? weight : 1];
  });
}

// The schedule types an old combined sampler name may end with ("DPM++ SDE Karras").
const SCHEDULES = ["Karras", "Exponential", "SGM Uniform"];

/**
 * ``[sampler, schedule type]`` in DAN's names from an infotext's "Sampler" and "Schedule
 * type": A1111's "Uniform" (the sampler's plain schedule) is DAN's "Automatic", and an old
 * combined name without a schedule type carries its own.
 */
export function samplerOf(sampler, scheduleType) {
  const schedule = !scheduleType || scheduleType === "Uniform" ? "Automatic" : scheduleType;
  const suffix = SCHEDULES.find((s) => sampler?.endsWith(` ${s}`));
  if (suffix && schedule === "Automatic") {
    return [sampler.slice(0, -suffix.length - 1), suffix];
  }
  return [sampler, schedule];
}

/** The generation settings of a PNG made by DAN (or A1111), or null if it carries none. */
export async function settingsOfPng(bytes) {
  const text = (await pngText(bytes)).parameters;
  if (!text) return null;
  const { prompt, negativePrompt, params } = parseInfotext(text);
  const [width, height] = (params.Size || "").split("x").map(Number);
  const number = (key) => (params[key] === undefined ? undefined : Number(params[key]));
  const [sampler, scheduler] = samplerOf(params.Sampler, params["Schedule type"]);
  return {
    prompt,
    negativePrompt,
    steps: number("Steps"),
    sampler,
    scheduler,
    cfgScale: number("CFG scale"),
    seed: number("Seed"),
    width: Number.isFinite(width) ? width : undefined,
    height: Number.isFinite(height) ? height : undefined,
    modelHash: params["Model hash"],
    modelName: params.Model,
    denoisingStrength: number("Denoising strength"),
    hiresScale: number("Hires upscale"),
    hiresUpscaler: params["Hires upscaler"],
    loras: parseLoras(params["Lora hashes"], params["Lora weights"]),
  };
}
