// A parser of the server-sent events text format (the HTML standard's "event stream
// interpretation"), for streams read with fetch(): EventSource cannot send an
// Authorization header.

export class SseParser {
  /** ``onEvent({event, data, id})`` is called for every complete event. */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.lastId = "";
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
  }

  /** Feed decoded text; lines and "\r\n" pairs may be split anywhere between calls. */
  push(text) {
    this.buffer += text;
    // A trailing "\r" may be the first half of "\r\n": keep it for the next call.
    const end = this.buffer.endsWith("\r") ? this.buffer.length - 1 : this.buffer.length;
    const lines = this.buffer.slice(0, end).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + this.buffer.slice(end);
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastId = value;
  }

  dispatch() {
    if (this.data.length) {
      this.onEvent({ event: this.event || "message", data: this.data.join("\n"), id: this.lastId });
    }
    this.reset();
  }
}

/**
 * Read ``response``'s body as an event stream until it ends, ``signal`` aborts, or
 * ``onEvent`` returns true (enough was read).
 */
export async function readEvents(response, onEvent, signal) {
  let enough = false;
  const parser = new SseParser((event) => {
    if (!enough && onEvent(event) === true) enough = true;
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const stop = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", stop);
  try {
    while (!enough) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(decoder.decode(value, { stream: true }));
    }
  } finally {
    signal?.removeEventListener("abort", stop);
    if (enough) stop();
  }
}
