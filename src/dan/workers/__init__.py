"""Workers: the loop that claims tasks and runs them on an engine, and its supervisor."""
