// One task on screen: submit it, show its queue position, a progress bar with the time left,
// step previews and a cancel button while it waits or runs, then its images (or caption) or
// the API's message.

import { ApiError } from "./api.js";
import { base64ToBytes, el, formatDuration, say } from "./dom.js";
import { Status, watchTask } from "./watch.js";

export class TaskPanel {
  /**
   * @param root     the element the panel fills
   * @param api      the Api
   * @param actions  ``{onSettings(bytes), onUseImage(dataUrl), onFinished(taskId, data)}``,
   *                 each optional: buttons under every image, and a hook for history
   */
  constructor(root, api, actions = {}, label = "Task") {
    this.api = api;
    this.actions = actions;
    this.urls = [];
    this.taskId = null;
    this.status = el("p", { class: "task-status", role: "status", "aria-live": "polite" });
    this.progress = el("progress", { max: 1, value: 0, "aria-label": `${label} progress` });
    this.eta = el("span", { class: "eta" });
    this.preview = el("img", { class: "preview", alt: "Preview of the latest step", hidden: true });
    this.cancel = el(
      "button",
      { type: "button", class: "secondary", onclick: () => this.stop() },
      "Cancel",
    );
    this.running = el(
      "div",
      { class: "task", hidden: true },
      this.status,
      el("div", { class: "bar" }, this.progress, this.eta),
      this.preview,
      this.cancel,
    );
    this.error = el("p", { class: "error", role: "alert", hidden: true });
    this.results = el("div", { class: "results" });
    root.replaceChildren(this.running, this.error, this.results);
  }

  clear() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
    this.results.replaceChildren();
    say(this.error, "");
  }

  fail(message) {
    say(this.error, message);
  }

  /**
   * Submit with ``submit()`` (which resolves with the async route's data, ``{taskId,
   * queuePosition}``, or throws an ApiError) and follow the task. Resolves with the final task
   * data (status 2 or 3), or null if it could not be submitted or followed.
   */
  async run(submit) {
    this.clear();
    let accepted;
    try {
      accepted = await submit();
    } catch (error) {
      this.fail(error instanceof ApiError ? error.message : String(error.message || error));
      return null;
    }
    this.taskId = accepted.taskId;
    this.show({ status: Status.PENDING, queuePosition: accepted.queuePosition, progress: 0 });
    this.running.hidden = false;
    this.cancel.disabled = false;
    this.running.scrollIntoView({ block: "nearest" }); // on a phone the panel is below the form
    try {
      const data = await watchTask(this.api, accepted.taskId, (state) => this.show(state));
      this.finish(data);
      this.actions.onFinished?.(accepted.taskId, data);
      return data;
    } catch (error) {
      this.fail(error.message || String(error));
      return null;
    } finally {
      this.running.hidden = true;
      this.preview.hidden = true;
      this.preview.removeAttribute("src");
    }
  }

  show({ status, queuePosition, progress, etaS, preview }) {
    if (status === Status.PENDING) {
      this.status.textContent = queuePosition
        ? `Waiting in the queue: position ${queuePosition}`
        : "Waiting for a worker";
    } else if (status === Status.RUNNING) {
      this.status.textContent = `Running: ${Math.round((progress || 0) * 100)} %`;
    }
    this.progress.value = progress || 0;
    this.eta.textContent = etaS ? `about ${formatDuration(etaS)} left` : "";
    if (preview) {
      this.preview.src = preview;
      this.preview.hidden = false;
    }
  }

  async stop() {
    if (!this.taskId) return;
    this.cancel.disabled = true;
    this.status.textContent = "Cancelling…";
    try {
      await this.api.post("/api/sd/task/cancel", { taskId: this.taskId });
    } catch (error) {
      this.fail(error.message);
      this.cancel.disabled = false;
    }
  }

  finish(data) {
    if (data.status === Status.FAILURE) {
      this.fail(data.message || "the task failed");
      return;
    }
    if (data.message && data.message !== "success") say(this.error, data.message, "info");
    if (data.caption !== undefined) return; // the view shows captions itself
    const images = data.images || [];
    images.forEach((image, i) => this.results.append(this.figure(image, data.seeds?.[i], i)));
  }

  figure(base64, seed, index) {
    const bytes = base64ToBytes(base64);
    const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
    this.urls.push(url);
    const name = `dan-${this.taskId}-${index + 1}.png`;
    const what = seed === undefined ? `Result ${index + 1}` : `Result ${index + 1}, seed ${seed}`;
    const buttons = [
      el("a", { class: "button secondary", href: url, download: name }, "Download PNG"),
    ];
    if (this.actions.onSettings) {
      buttons.push(
        el(
          "button",
          { type: "button", class: "secondary", onclick: () => this.actions.onSettings(bytes) },
          "Use these settings again",
        ),
      );
    }
    if (this.actions.onUseImage) {
      const dataUrl = `data:image/png;base64,${base64}`;
      buttons.push(
        el(
          "button",
          { type: "button", class: "secondary", onclick: () => this.actions.onUseImage(dataUrl) },
          "Use as input image",
        ),
      );
    }
    return el(
      "figure",
      { class: "result" },
      el("img", { src: url, alt: what }),
      el(
        "figcaption",
        {},
        seed === undefined ? "" : el("span", { class: "result-seed" }, `Seed ${seed}`),
        ...buttons,
      ),
    );
  }
}
