// The landing view: what the network has made and how many nodes are online.

import { $, say } from "../dom.js";

export function countOnline(nodes) {
  return nodes.filter((node) => node.status === "online").length;
}

export function setupHome(app) {
  const format = (n) => (typeof n === "number" ? n.toLocaleString() : "–");

  async function show() {
    const error = $("#home-error");
    say(error, "");
    const [stats, nodes] = await Promise.allSettled([
      app.api.get("/api/sd/statistics"),
      app.api.get("/api/nodes"),
    ]);
    if (stats.status === "fulfilled") {
      $("#stat-total").textContent = format(stats.value.totalCount);
      $("#stat-day").textContent = format(stats.value.countInLast24Hours);
      $("#stat-week").textContent = format(stats.value.countInLastWeek);
    }
    if (nodes.status === "fulfilled")
      $("#stat-nodes").textContent = format(countOnline(nodes.value));
    const failed = [stats, nodes].find((result) => result.status === "rejected");
    if (failed) say(error, failed.reason.message);
  }

  return { show };
}
