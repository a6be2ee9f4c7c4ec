// Who the page speaks for: an API key kept in this browser, and the sign-in session (a cookie
// plus a CSRF token) where the server offers sign-in.

const KEY = "dan.apiKey";

export class Credentials {
  constructor(storage = window.localStorage) {
    this.storage = storage;
    this.session = { available: false, signedIn: false, csrf: "", providers: [], account: null };
  }

  key() {
    return this.storage.getItem(KEY) || "";
  }

  setKey(value) {
    const key = value.trim();
    if (key) this.storage.setItem(KEY, key);
    else this.storage.removeItem(KEY);
  }

  /** The key requests carry: none while signed in (the session cookie says who it is). */
  bearer() {
    return this.session.signedIn ? "" : this.key();
  }

  csrf() {
    return this.session.signedIn ? this.session.csrf || "" : "";
  }

  /** Read GET /auth/session; a server without sign-in (404) leaves it unavailable. */
  async loadSession(api) {
    try {
      const data = await api.get("/auth/session");
      this.session = {
        available: true,
        signedIn: Boolean(data.signedIn),
        csrf: data.csrf || "",
        providers: Array.isArray(data.providers) ? data.providers : [],
        account: data.account ?? null,
      };
    } catch (error) {
      if (error.status !== 404) throw error;
      this.session = { available: false, signedIn: false, csrf: "", providers: [], account: null };
    }
    return this.session;
  }
}
