// Donors: the honor leaderboard, the nodes, and the command that joins a GPU to this network.

import { $, el, say } from "../dom.js";
import { countOnline } from "./home.js";

/** ``value`` as one shell word. */
export function shellWord(value) {
  return /^[\w./:=@+-]+$/.test(value) ? value : `'${value.replaceAll("'", "'\\''")}'`;
}

export function setupDonors(app) {
  const name = $("#node-name");
  const command = $("#join-command");
  const note = $("#join-note");

  function showCommand() {
    const key = app.credentials.key() || "YOUR_API_KEY";
    const node = name.value.trim() || "my-gpu";
    command.textContent =
      `dan node --server ${shellWord(location.origin)} --api-key ${shellWord(key)} ` +
      `--name ${shellWord(node)}`;
    if (!app.credentials.key()) {
      note.textContent = "Put your API key in (Account) and it appears here.";
    } else if (app.me && !app.me.canRunNodes && !app.me.isAdmin) {
      note.textContent =
        `Your account may not run nodes yet: an admin can allow it with ` +
        `"dan keys roles ${app.me.nickname} --nodes".`;
    } else {
      note.textContent = "";
    }
  }

  async function copy() {
    try {
      await navigator.clipboard.writeText(command.textContent);
      note.textContent = "Copied.";
    } catch {
      // no clipboard (plain http, or denied): select it for the user to copy
      getSelection().selectAllChildren(command);
      note.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
    }
  }

  async function show() {
    showCommand();
    const error = $("#donors-error");
    say(error, "");
    const [board, nodes] = await Promise.allSettled([
      app.api.get("/api/honor/leaderboard"),
      app.api.get("/api/nodes"),
    ]);
    if (board.status === "fulfilled") {
      $("#leaderboard").replaceChildren(
        ...board.value.map((row) =>
          el("tr", {}, el("td", {}, row.rank), el("td", {}, row.nickname), el("td", {}, row.honor)),
        ),
      );
      if (!board.value.length)
        $("#leaderboard").append(emptyRow(3, "No donor has earned honor yet."));
    }
    if (nodes.status === "fulfilled") {
      $("#nodes").replaceChildren(
        ...nodes.value.map((node) =>
          el(
            "tr",
            { class: node.status },
            el("td", {}, node.name),
            el("td", {}, node.owner),
            el("td", {}, node.tasksDone),
            el("td", {}, node.status),
          ),
        ),
      );
      if (!nodes.value.length) $("#nodes").append(emptyRow(4, "No node has joined yet."));
      $("#nodes-online").textContent = `${countOnline(nodes.value)} online`;
    }
    const failed = [board, nodes].find((result) => result.status === "rejected");
    if (failed) say(error, failed.reason.message);
  }

  name.addEventListener("input", showCommand);
  $("#join-copy").addEventListener("click", copy);
  $("#donors-refresh").addEventListener("click", show);
  app.onAccount(showCommand);
  return { show };
}

function emptyRow(columns, text) {
  return el("tr", {}, el("td", { colspan: columns, class: "hint" }, text));
}
