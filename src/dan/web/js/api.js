// The DAN HTTP API as the page calls it: one place that adds the key (or the session's CSRF
// token) and turns every failure into an ApiError carrying the API's own message.

/** A failed call: ``message`` is the API's own, ``status`` the HTTP status (0: unreachable). */
export class ApiError extends Error {
  constructor(message, { status = 0, code = null, data = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.data = data;
  }
}

/** The error a non-2xx response stands for, with the message the server gave. */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say; the status line is all there is
  }
  const message =
    (body && (body.message || body.detail || body.msg)) ||
    `${response.status} ${response.statusText || "error"} from the server`;
  return new ApiError(typeof message === "string" ? message : JSON.stringify(message), {
    status: response.status,
    code: body && body.code,
    data: body && body.data,
  });
}

function unreachable(error) {
  return new ApiError(`Could not reach the DAN server: ${error.message}`);
}

export class Api {
  /**
   * @param credentials  ``{bearer(): string, csrf(): string}``: the API key to send as a
   *                     Bearer token, and the session's CSRF token for POST and DELETE.
   * @param base         the API's origin; "" for the page's own.
   */
  constructor(credentials, base = "") {
    this.credentials = credentials;
    this.base = base;
  }

  headers(method, json) {
    const headers = {};
    const key = this.credentials.bearer();
    if (key) headers.Authorization = `Bearer ${key}`;
    const csrf = this.credentials.csrf();
    if (csrf && method !== "GET") headers["X-CSRF-Token"] = csrf;
    if (json) headers["Content-Type"] = "application/json";
    return headers;
  }

  /** The whole success envelope ``{code, data, message}``; throws ApiError otherwise. */
  async call(method, path, body = undefined, { signal } = {}) {
    const json = body !== undefined;
    let response;
    try {
      response = await fetch(this.base + path, {
        method,
        headers: this.headers(method, json),
        body: json ? JSON.stringify(body) : undefined,
        credentials: "same-origin",
        signal,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw unreachable(error);
    }
    if (!response.ok) throw await errorFrom(response);
    const envelope = await response.json();
    if (envelope && typeof envelope.code === "number" && envelope.code !== 200) {
      throw new ApiError(envelope.message || "the request failed", envelope);
    }
    return envelope;
  }

  async get(path, options) {
    return (await this.call("GET", path, undefined, options)).data;
  }

  async post(path, body = {}, options) {
    return (await this.call("POST", path, body, options)).data;
  }

  async delete(path, options) {
    return (await this.call("DELETE", path, undefined, options)).data;
  }

  /**
   * An open streaming response (server-sent events) for ``path``, resuming after event
   * ``lastEventId`` when given; throws ApiError.
   */
  async stream(path, signal, lastEventId = "") {
    const headers = { ...this.headers("GET", false), Accept: "text/event-stream" };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    let response;
    try {
      response = await fetch(this.base + path, {
        headers,
        credentials: "same-origin",
        cache: "no-store",
        signal,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw unreachable(error);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }
}
