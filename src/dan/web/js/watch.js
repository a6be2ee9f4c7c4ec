// Following a task until it ends, through the server's live event stream
// (GET /api/sd/task/events, server-sent events), read with fetch() so that the API key can go
// in the Authorization header, which EventSource cannot send.

import { readEvents } from "./sse.js";
import { sleep } from "./dom.js";

const RECONNECT_MS = 1000;
const MAX_FAILURES = 5; // network failures in a row before giving up

/** Task statuses of the API. */
export const Status = Object.freeze({ PENDING: 0, RUNNING: 1, SUCCESS: 2, FAILURE: 3 });

export const finished = (status) => status === Status.SUCCESS || status === Status.FAILURE;

/**
 * Follow task ``taskId`` until it ends.
 *
 * ``onState({taskId, status, queuePosition, progress, etaS, preview})`` is called whenever
 * something changed (``preview``, a data: URL, only when a new one arrived). Resolves with the
 * final task data, exactly as POST /api/sd/task/status returns it (``images`` and ``seeds``,
 * ``caption``, or a failure's ``message``). Rejects with an ApiError, or an AbortError when
 * ``signal`` aborts. A stream that breaks before the end (a proxy's timeout, a replica
 * restarting) is opened again after the last event seen.
 */
export async function watchTask(api, taskId, onState, { signal } = {}) {
  const path = `/api/sd/task/events?taskId=${encodeURIComponent(taskId)}`;
  let lastId = "";
  let failures = 0;
  for (;;) {
    let result = null;
    try {
      const response = await api.stream(path, signal, lastId);
      await readEvents(
        response,
        ({ event, data, id }) => {
          lastId = id || lastId;
          failures = 0;
          if (event === "state") onState(JSON.parse(data));
          if (event !== "done") return false;
          result = JSON.parse(data);
          return true;
        },
        signal,
      );
    } catch (error) {
      // The server unreachable, or the connection cut mid-stream: try again a few times;
      // any answer of the API's own (an unknown task, a refused key) is final.
      const network = error instanceof TypeError || (error.status === 0 && !signal?.aborted);
      if (!network || ++failures > MAX_FAILURES) throw error;
    }
    if (result) return result;
    signal?.throwIfAborted();
    await sleep(RECONNECT_MS * Math.max(1, failures), signal);
  }
}
