// The account's recent tasks, from the server (GET /api/sd/tasks?limit=&before=), a page at
// a time, so that history follows the account to any browser and survives a reload.

const LIMIT = 20;

export class History {
  constructor(api) {
    this.api = api;
  }

  /** A page of tasks, newest first: ``{tasks: [...], next: cursor or null}``. */
  async list(before = null) {
    const query = new URLSearchParams({ limit: String(LIMIT) });
    if (before) query.set("before", before);
    return this.api.get(`/api/sd/tasks?${query}`);
  }
}
