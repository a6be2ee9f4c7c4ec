// The playground's entry point: builds the API client, the views and a hash router.

import { Credentials } from "./account.js";
import { Api } from "./api.js";
import { $, $$, say } from "./dom.js";
import { History } from "./history.js";
import { setupAccount } from "./views/account.js";
import { setupCreate } from "./views/create.js";
import { setupDonors } from "./views/donors.js";
import { setupHistory } from "./views/history.js";
import { setupHome } from "./views/home.js";
import { setupTools } from "./views/tools.js";

const ROUTES = ["home", "create", "tools", "history", "donors", "account"];

function createApp() {
  const credentials = new Credentials();
  const api = new Api(credentials);
  let models = null;
  const app = {
    api,
    credentials,
    history: new History(api),
    me: null, // GET /api/user/info of the current key or session, or null
    meError: null,
    listeners: [],
    /** A message for something that went wrong outside any form. */
    notice(message) {
      say($("#notice"), message);
    },
    go(route) {
      location.hash = `#/${route === "home" ? "" : route}`;
    },
    /** GET /api/sd/supportedModelInfo, asked once per page load (``fresh`` asks again). */
    models(fresh = false) {
      if (!models || fresh) models = api.get("/api/sd/supportedModelInfo");
      models.catch(() => (models = null));
      return models;
    },
    /** Call ``listener(me)`` now and whenever the account changes (a new key, sign-in). */
    onAccount(listener) {
      app.listeners.push(listener);
    },
    async refreshAccount() {
      try {
        await credentials.loadSession(api);
      } catch (error) {
        app.notice(`Sign-in is unavailable: ${error.message}`);
      }
      try {
        app.me = await api.get("/api/user/info");
        app.meError = null;
      } catch (error) {
        app.me = null;
        app.meError = error.message;
      }
      showWho(app);
      for (const listener of app.listeners) listener(app.me);
    },
  };
  return app;
}

function showWho(app) {
  const who = $("#who");
  if (app.me) {
    who.textContent = `${app.me.nickname} · ${app.me.honor} honor`;
  } else if (app.credentials.session.signedIn) {
    who.textContent = "Signed in";
  } else {
    who.textContent = app.credentials.key() ? "Key refused" : "No API key";
  }
}

function route(views) {
  if (location.hash === "#signed-in") history.replaceState(null, "", "#/account"); // back from sign-in
  const name = location.hash.replace(/^#\/?/, "").split("?")[0] || "home";
  const current = ROUTES.includes(name) ? name : "home";
  for (const section of $$("[data-view]")) section.hidden = section.dataset.view !== current;
  for (const link of $$("nav [data-route]")) {
    if (link.dataset.route === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title =
    current === "home" ? "DAN playground" : `${$(`#${current}-title`).textContent} · DAN`;
  views[current].show?.();
  return current;
}

async function main() {
  const app = createApp();
  const views = {
    home: setupHome(app),
    create: setupCreate(app),
    tools: setupTools(app),
    history: setupHistory(app),
    donors: setupDonors(app),
    account: setupAccount(app),
  };
  app.views = views;
  $("#notice").addEventListener("click", () => say($("#notice"), ""));
  route(views);
  window.addEventListener("hashchange", () => {
    const current = route(views);
    $(`#${current}-title`).focus();
  });
  await app.refreshAccount();
  document.documentElement.dataset.ready = "true"; // for tests: the first load has settled
}

main();
