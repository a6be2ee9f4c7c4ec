// History: the account's recent tasks (from the server, or kept in this browser), each one
// can be opened again (its images while the server keeps them) or used as settings.

import { $, el, formatTime, say } from "../dom.js";
import { TaskPanel } from "../task-panel.js";

const STATUS = ["waiting", "running", "done", "failed"];

function statusText(status) {
  return typeof status === "number" ? (STATUS[status] ?? String(status)) : String(status ?? "");
}

export function setupHistory(app) {
  const list = $("#history-list");
  const more = $("#history-more");
  const error = $("#history-error");
  let next = null;
  const panel = new TaskPanel(
    $("#history-task"),
    app.api,
    {
      onSettings: (bytes) => app.views.create.reuseBytes?.(bytes),
    },
    "Task",
  );

  function settingsOf(task) {
    return {
      prompt: task.prompt,
      negativePrompt: task.negativePrompt,
      steps: task.steps,
      sampler: task.sampler,
      scheduler: task.scheduler,
      seed: task.seed,
      width: task.width,
      height: task.height,
      modelName: task.model, // the server's list names the checkpoint
    };
  }

  function item(task) {
    const size = task.width && task.height ? `${task.width}×${task.height}` : "";
    const facts = [
      task.kind,
      statusText(task.status),
      task.expired ? "images deleted" : "",
      size,
      task.seed !== undefined && task.seed !== null ? `seed ${task.seed}` : "",
      formatTime(task.createdAt),
    ]
      .filter(Boolean)
      .join(" · ");
    const open = () => {
      $("#history-open").hidden = false;
      $("#history-open-title").textContent = task.prompt
        ? `Task: ${task.prompt.slice(0, 60)}`
        : "Task";
      panel.run(async () => ({ taskId: task.taskId, queuePosition: 0 }));
    };
    const reuse = () => {
      app.views.create.apply(settingsOf(task));
      app.go("create");
    };
    return el(
      "li",
      { class: "entry", "data-task": task.taskId },
      el("p", { class: "prompt" }, task.prompt || el("em", {}, "(no prompt)")),
      el("p", { class: "hint" }, facts),
      el(
        "div",
        { class: "row" },
        el("button", { type: "button", class: "secondary", onclick: open }, "Show"),
        task.prompt !== undefined
          ? el(
              "button",
              { type: "button", class: "secondary", onclick: reuse },
              "Use these settings",
            )
          : null,
      ),
    );
  }

  async function load(append = false) {
    say(error, "");
    try {
      const page = await app.history.list(append ? next : null);
      next = page.next;
      const items = page.tasks.map(item);
      if (append) list.append(...items);
      else list.replaceChildren(...items);
      if (!append && !items.length) list.append(el("li", { class: "hint" }, "No task yet."));
      more.hidden = !next;
    } catch (err) {
      say(error, err.message);
    }
  }

  more.addEventListener("click", () => load(true));
  app.onAccount(() => {
    if (!$("#view-history").hidden) load();
  });
  return { show: () => load() };
}
