// The account's recent tasks, behind one interface: the server's list
// (GET /api/sd/tasks?limit=&before=) where it has one, else a list kept in this browser's
// localStorage (per account), so that history survives a reload either way.

const LIMIT = 20;
const KEPT = 200; // entries kept in localStorage per account

export class History {
  constructor(api, storage = window.localStorage) {
    this.api = api;
    this.storage = storage;
    this.account = "local";
    this.serverMissing = false;
  }

  /** Whose history: an account id (entries in localStorage are kept per account). */
  setAccount(account) {
    this.account = account || "local";
  }

  get local() {
    return this.serverMissing;
  }

  /** A page of tasks, newest first: ``{tasks: [...], next: cursor or null}``. */
  async list(before = null) {
    if (!this.serverMissing) {
      const query = new URLSearchParams({ limit: String(LIMIT) });
      if (before) query.set("before", before);
      try {
        return await this.api.get(`/api/sd/tasks?${query}`);
      } catch (error) {
        if (!error.routeMissing) throw error;
        this.serverMissing = true;
      }
    }
    return this.localPage(before);
  }

  localPage(before) {
    const all = this.read();
    const start = before ? all.findIndex((task) => task.taskId === before) + 1 : 0;
    const tasks = all.slice(start, start + LIMIT);
    const next = start + LIMIT < all.length ? tasks[tasks.length - 1].taskId : null;
    return { tasks, next };
  }

  /**
   * Note a task (new, or changed: ``fields`` are merged into the entry with its ``taskId``).
   * The server keeps its own list; this one matters where it has none.
   */
  remember(fields) {
    const all = this.read();
    const index = all.findIndex((task) => task.taskId === fields.taskId);
    if (index >= 0) all[index] = { ...all[index], ...fields };
    else all.unshift(fields);
    this.storage.setItem(this.storageKey(), JSON.stringify(all.slice(0, KEPT)));
  }

  read() {
    try {
      const list = JSON.parse(this.storage.getItem(this.storageKey()) || "[]");
      return Array.isArray(list) ? list : [];
    } catch {
      return [];
    }
  }

  storageKey() {
    return `dan.history.${this.account}`;
  }
}
