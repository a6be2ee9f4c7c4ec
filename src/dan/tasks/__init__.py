"""The queue: TaskService (business rules), TaskStore (SQL, claims, leases), TaskWatcher."""
