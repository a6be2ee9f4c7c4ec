// Account: the API key this browser sends, the account's honor and roles, its keys, and
// sign-in where the server offers it.

import { $, el, formatTime, say } from "../dom.js";

export function setupAccount(app) {
  const keyInput = $("#api-key");
  const keyStatus = $("#key-status");

  async function saveKey(event) {
    event.preventDefault();
    app.credentials.setKey(keyInput.value);
    keyStatus.textContent = keyInput.value.trim() ? "Saved in this browser." : "Forgotten.";
    await app.refreshAccount();
  }

  async function forgetKey() {
    keyInput.value = "";
    app.credentials.setKey("");
    keyStatus.textContent = "Forgotten.";
    await app.refreshAccount();
  }

  function toggleShow() {
    const show = keyInput.type === "password";
    keyInput.type = show ? "text" : "password";
    $("#api-key-show").textContent = show ? "Hide" : "Show";
    $("#api-key-show").setAttribute("aria-pressed", String(show));
  }

  function showMe(me) {
    keyInput.value = app.credentials.key();
    say($("#me-error"), me ? "" : app.meError);
    $("#me").hidden = !me;
    $("#keys-panel").hidden = !me;
    if (!me) return;
    $("#me-nickname").textContent = me.nickname;
    $("#me-honor").textContent = me.honor;
    $("#me-weight").textContent = me.queueWeight;
    const roles = [me.isAdmin && "admin", me.canRunNodes && "may run nodes"].filter(Boolean);
    $("#me-roles").textContent = roles.join(", ") || "user";
  }

  function showSession() {
    const session = app.credentials.session;
    const box = $("#signin");
    box.hidden = !session.available || (!session.signedIn && !session.providers.length);
    if (box.hidden) return;
    const account = session.account;
    const name = account && (account.nickname || account.name || account.id || account);
    $("#signin-state").textContent = session.signedIn
      ? `Signed in${name ? ` as ${name}` : ""}. The page acts for this account; a key saved ` +
        "below only goes into the donors' node command."
      : "Sign in to use this network without copying a key around.";
    $("#signin-providers").replaceChildren(
      ...(session.signedIn ? [] : session.providers).map((provider) =>
        el(
          "li",
          {},
          el(
            "a",
            { class: "button", href: `/auth/login/${encodeURIComponent(provider.id)}?next=/` },
            `Sign in with ${provider.name}`,
          ),
        ),
      ),
    );
    $("#signout").hidden = !session.signedIn;
    $("#signin-key").hidden = !session.signedIn;
  }

  async function signOut() {
    try {
      await app.api.post("/auth/logout", {});
      await app.refreshAccount();
    } catch (error) {
      say($("#signin-error"), error.message);
    }
  }

  async function sessionKey() {
    try {
      const data = await app.api.post("/auth/key", {});
      await loadKeys();
      showNewKey(data.key);
    } catch (error) {
      say($("#signin-error"), error.message);
    }
  }

  function showNewKey(key) {
    $("#new-key").hidden = false;
    $("#new-key-value").value = key;
    $("#new-key-value").select();
  }

  async function loadKeys() {
    const keysError = $("#keys-error");
    say(keysError, "");
    try {
      const keys = await app.api.get("/api/user/keys");
      $("#keys").replaceChildren(...keys.map(keyRow));
    } catch (error) {
      say(keysError, error.message);
    }
  }

  function keyRow(key) {
    const revoke = async () => {
      if (!confirm(`Revoke the key ${key.prefix}…? Anything using it stops working.`)) return;
      try {
        await app.api.delete(`/api/user/keys/${encodeURIComponent(key.id)}`);
        await loadKeys();
      } catch (error) {
        say($("#keys-error"), error.message);
      }
    };
    return el(
      "tr",
      {},
      el("td", {}, el("code", {}, `${key.prefix}…`)),
      el("td", {}, formatTime(key.createdAt)),
      el("td", {}, formatTime(key.lastUsedAt) || "never"),
      el(
        "td",
        {},
        el(
          "button",
          {
            type: "button",
            class: "secondary",
            "aria-label": `Revoke key ${key.prefix}`,
            onclick: revoke,
          },
          "Revoke",
        ),
      ),
    );
  }

  async function createKey() {
    try {
      const data = await app.api.post("/api/user/keys", {});
      await loadKeys(); // the new key's row is there when the key is shown
      showNewKey(data.key);
    } catch (error) {
      say($("#keys-error"), error.message);
    }
  }

  async function revokeOthers() {
    if (!confirm("Revoke every other key of this account? Nodes using them stop.")) return;
    try {
      await app.api.delete("/api/user/keys");
      await loadKeys();
    } catch (error) {
      say($("#keys-error"), error.message);
    }
  }

  $("#key-form").addEventListener("submit", saveKey);
  $("#api-key-forget").addEventListener("click", forgetKey);
  $("#api-key-show").addEventListener("click", toggleShow);
  $("#signout").addEventListener("click", signOut);
  $("#signin-key").addEventListener("click", sessionKey);
  $("#key-create").addEventListener("click", createKey);
  $("#keys-revoke-others").addEventListener("click", revokeOthers);
  $("#new-key-use").addEventListener("click", async () => {
    app.credentials.setKey($("#new-key-value").value);
    $("#new-key").hidden = true;
    keyStatus.textContent = "Saved in this browser.";
    await app.refreshAccount();
  });
  app.onAccount((me) => {
    showMe(me);
    showSession();
    if (me && !$("#view-account").hidden) loadKeys();
  });
  return {
    show() {
      showMe(app.me);
      showSession();
      if (app.me) loadKeys();
    },
  };
}
