"""Thin routers: parse the wire schema, call one service function, map the result."""
