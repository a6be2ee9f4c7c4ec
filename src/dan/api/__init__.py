"""The HTTP edge: app factory, thin routers, wire schemas, one error-to-response table."""
