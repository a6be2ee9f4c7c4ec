// Following a task until it ends, behind one function: the server's live event stream
// (GET /api/sd/task/events, server-sent events) where it has one, else polling
// POST /api/sd/task/status.

import { readEvents } from "./sse.js";
import { sleep } from "./dom.js";

const POLL_MS = 400;
const RECONNECT_MS = 1000;

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
 * ``signal`` aborts.
 */
export async function watchTask(api, taskId, onState, { signal } = {}) {
  if (api.eventsMissing !== true) {
    try {
      return await followEvents(api, taskId, onState, signal);
    } catch (error) {
      if (!error.routeMissing) throw error;
      api.eventsMissing = true; // this server has no event stream: poll from now on
    }
  }
  return pollStatus(api, taskId, onState, signal);
}

async function followEvents(api, taskId, onState, signal) {
  const path = `/api/sd/task/events?taskId=${encodeURIComponent(taskId)}`;
  for (;;) {
    let result = null;
    const response = await api.stream(path, signal);
    await readEvents(
      response,
      ({ event, data }) => {
        if (event === "state") onState(JSON.parse(data));
        if (event !== "done") return false;
        result = unwrap(JSON.parse(data));
        return true;
      },
      signal,
    );
    if (result) return result;
    signal?.throwIfAborted();
    // The stream broke before the end (a proxy's timeout, a replica restarting): the task
    // may have ended meanwhile; otherwise listen again.
    const now = await api.post("/api/sd/task/status", { taskId }, { signal });
    if (finished(now.status)) return now;
    await sleep(RECONNECT_MS, signal);
  }
}

/** ``done`` carries the status data; accept it wrapped in the API's envelope too. */
function unwrap(payload) {
  return payload && typeof payload.code === "number" && payload.data ? payload.data : payload;
}

async function pollStatus(api, taskId, onState, signal) {
  const eta = etaEstimator();
  let last = "";
  for (;;) {
    const data = await api.post("/api/sd/task/status", { taskId }, { signal });
    if (finished(data.status)) return data;
    const state = {
      taskId,
      status: data.status,
      queuePosition: data.queuePosition,
      progress: data.progress,
      etaS: eta(data),
    };
    const key = JSON.stringify(state);
    if (key !== last) onState(state);
    last = key;
    await sleep(POLL_MS, signal);
    signal?.throwIfAborted();
  }
}

/** Seconds left, from the progress made since the task started running (null until known). */
function etaEstimator() {
  let start = null;
  return ({ status, progress }) => {
    if (status !== Status.RUNNING) return null;
    const now = performance.now() / 1000;
    if (start === null) start = { time: now, progress };
    const done = progress - start.progress;
    if (done <= 0) return null;
    return ((now - start.time) / done) * (1 - progress);
  };
}
